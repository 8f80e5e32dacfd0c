#!/usr/bin/env bash
# Run HERE (the CPU machine), before the device call: makes what bench/gpu/run.sh takes along,
# in two git-ignored folders passed as `carry`:
#   .whl/         wheels the GPU image lacks: hydra-core, omegaconf, antlr4 (pure Python) and
#                 decord (decodes the demo mp4s; PyAV's 36 MB wheel would not fit the 64 MiB)
#   .gpu_bundle/  small demo shards and the MiniLM text encoder saved in fp16 (45 MB, not 88)
# Usage: bash bench/gpu/prepare.sh   (PYTHON=... to pick the interpreter; default the venv's)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-/work/main/.venv/bin/python}
mkdir -p .whl .gpu_bundle
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 decord==0.6.0
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) is published as source only.
"$PYTHON" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
[ -d .gpu_bundle/demo/shards ] ||
  PYTHONPATH=. "$PYTHON" -m data.demo --out .gpu_bundle/demo --clips-per-source 8 --images-per-source 8
rm -rf .gpu_bundle/demo/shards/.tessera-plans  # a plan cached here names this machine's paths
PYTHONPATH=. "$PYTHON" -m bench.gpu.half_text_encoder .gpu_bundle/minilm_fp16
du -sh .whl .gpu_bundle
git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "tracked files: %.1f MiB\n", $1 / 2^20}'

#!/usr/bin/env bash
# The one-shot GPU check (issue 17), run ON the H200 machine from the repository root:
#   1. bench.gpu.mfu: matmul ceiling, 1B/3B DiT steps (eager/compiled, +/- checkpointing), MFU,
#      peak memory, the SDPA kernel and the top 10 kernels of a profiled step;
#   2. bench.gpu.trainer_check: the real trainer, parallel=fsdp on a world of one, bf16,
#      checkpoint, resume and the bitwise comparison;
#   3. bench.gpu.latent_check: python -m train.encode on the GPU, then DiT-base on the latent
#      shards against online encoding: step time, tokens/s, peak GPU memory, same batches.
# Results (results.json, results.txt, trainer_check.json, logs) go to $OUT, else bench/gpu/results.
# First, here on the CPU machine: bash bench/gpu/prepare.sh (makes .whl/ and .gpu_bundle/).
# Then the device call (about 7 to 8 minutes of its 9):
#   run(command="bash bench/gpu/run.sh", carry=[".whl", ".gpu_bundle"], timeout_s=540)
# MFU_BUDGET_S (default 240, so that all three fit the call) is when the sweep stops starting cases.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/gpu/results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
SITE=/tmp/tessera-site
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl || { echo "installing the carried wheels failed"; exit 1; }
export PYTHONPATH="$PWD:$SITE"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -m bench.gpu.mfu --budget-s "${MFU_BUDGET_S:-240}" --out "$OUT" 2>&1 | tee "$OUT/mfu.log"
mfu=${PIPESTATUS[0]}
"$PYTHON" -m bench.gpu.trainer_check --bundle .gpu_bundle --out "$OUT" 2>&1 | tail -40
trainer=${PIPESTATUS[0]}
"$PYTHON" -m bench.gpu.latent_check --bundle .gpu_bundle --out "$OUT" 2>&1 | tail -20
latent=${PIPESTATUS[0]}
echo "== summary (mfu exit $mfu, trainer check exit $trainer, latent check exit $latent)"
cat "$OUT/results.txt" 2>/dev/null
exit $((mfu || trainer || latent))

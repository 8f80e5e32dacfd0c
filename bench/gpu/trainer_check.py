"""The real trainer on one GPU: parallel=fsdp on a world of one, bf16, 6 steps with checkpoints
every 3; then a second run resumes from step 3's checkpoint and must give the same losses for
steps 4-6 and the same exported weights, bit for bit (as tests/test_fault_tolerance.py checks on
CPU). Writes trainer_check.json to --out and exits 1 when a check fails.

    python -m bench.gpu.trainer_check --bundle .gpu_bundle --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from train.checkpoint import find_weights, read_weights

ROOT = Path(__file__).resolve().parents[2]
STEPS, RESUME_AT = 6, 3


def overrides(bundle: Path, run_dir: Path, model: str, precision: str) -> list[str]:
    return [
        f"data.shards={bundle / 'demo' / 'shards'}",
        f"text_encoder.path={bundle / 'minilm_fp16'}",
        f"train.run_dir={run_dir}",
        f"model={model}",
        "parallel=fsdp",
        f"train.precision={precision}",
        f"train.steps={STEPS}",
        f"train.checkpoint_every={RESUME_AT}",
        "train.keep_last=10",
        "train.log_every=1",
        "train.sample_prompts=[]",
        "train.ema_decay=0.9",
        "logger=none",
    ]


def torchrun(args: list[str], log: Path) -> tuple[str, float]:
    """torchrun with one process on this machine's GPU (args: a script or `-m module`, and
    its arguments); its output and wall time. Stops the check when it fails."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(
            f"{args[:2]} failed ({result.returncode}); the end of {log}:\n{log.read_text()[-3000:]}"
        )
    return result.stdout + result.stderr, time.perf_counter() - started


def train(args: list[str], log: Path) -> tuple[str, float]:
    """`python -m train` with deterministic kernels, under torchrun."""
    return torchrun([str(ROOT / "bench" / "gpu" / "deterministic_train.py"), *args], log)


def check_parser(description: str) -> argparse.ArgumentParser:
    """The options every GPU check takes: the carried bundle, where results go, the DiT size."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu_bundle")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or "bench/gpu/results")
    )
    parser.add_argument("--model", default="base", help="a DiT size (model/dit.py)")
    return parser


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines]


def same_exports(a: Path, b: Path) -> bool:
    first, second = (read_weights(find_weights(run)) for run in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def main() -> None:
    parser = check_parser(__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", help="train.precision (fp32 on a CPU)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "trainer_runs"
    straight, resumed = work / "straight", work / "resumed"
    shutil.rmtree(work, ignore_errors=True)
    _, straight_s = train(
        overrides(args.bundle, straight, args.model, args.precision), args.out / "straight.log"
    )
    step_dir = f"checkpoints/step_{RESUME_AT:08d}"
    shutil.copytree(straight / step_dir, resumed / step_dir)
    output, resumed_s = train(
        overrides(args.bundle, resumed, args.model, args.precision), args.out / "resumed.log"
    )
    expected, got = losses(straight)[RESUME_AT:], losses(resumed)
    report = {
        "model": args.model,
        "precision": args.precision,
        "steps": STEPS,
        "straight_s": straight_s,
        "resumed_s": resumed_s,
        "resumed_from_checkpoint": f"resumed from step {RESUME_AT}" in output,
        "straight_losses": losses(straight),
        "resumed_losses": got,
        "losses_bitwise": expected == got,
        "exports_bitwise": same_exports(straight, resumed),
    }
    shutil.rmtree(work)  # checkpoints are large and nothing reads them after the comparison
    (args.out / "trainer_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    checks = ("resumed_from_checkpoint", "losses_bitwise", "exports_bitwise")
    failed = [name for name in checks if not report[name]]
    if failed:
        raise SystemExit(f"trainer check failed: {', '.join(failed)}")
    print("trainer check passed: fsdp on one process, checkpoint, resume, bitwise identical")


if __name__ == "__main__":
    main()

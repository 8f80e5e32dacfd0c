"""What the decoded-clip and encoding caches buy a small model over many epochs.

Trains the same DiT on the demo data twice, side by side in one run: as the default does
(random crops, every clip decoded and encoded every step), then as the scaling demo does
(data.augment=false, data.decoded_cache_mb, train.encoding_cache_mb). Prints the wall time
and the token rate after the first epoch, when the caches are warm (the harmonic mean of
the logged steps' rates).

    make demo-autoencoder   # the demo data and autoencoder, once
    python -m bench.data_caches --size micro --steps 480
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "uncached": ["data.augment=true", "data.decoded_cache_mb=0", "train.encoding_cache_mb=0"],
    "cached": ["data.augment=false", "data.decoded_cache_mb=256", "train.encoding_cache_mb=256"],
}


def train(size: str, steps: int, overrides: list[str], run_dir: Path) -> tuple[float, list[dict]]:
    """(wall seconds, logged metrics) of a run of `steps` steps."""
    command = [sys.executable, "-m", "train", "experiment=scaling_demo", f"model={size}"]
    command += ["train.budget_flops=0", f"train.steps={steps}", "train.log_every=10", "eval=none"]
    command += ["logger=none", f"train.run_dir={run_dir}", *overrides]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return wall, [m for m in metrics if "perf/tokens_per_s" in m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="micro")
    parser.add_argument("--steps", type=int, default=480, help="the demo has 120 batches an epoch")
    parser.add_argument("--epoch", type=int, default=120, help="steps in the first epoch")
    args = parser.parse_args()
    print(f"{args.size}, {args.steps} steps; token rate over steps {args.epoch + 1}-{args.steps}")
    print("| setting | wall s | tokens/s after epoch 1 | vs uncached |")
    print("|---|---|---|---|")
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SETTINGS.items():
            wall, metrics = train(args.size, args.steps, overrides, Path(tmp) / name)
            warm = [m["perf/tokens_per_s"] for m in metrics if m["step"] > args.epoch]
            rate = len(warm) / sum(1 / r for r in warm)  # harmonic: each step's time counts
            baseline = baseline or rate
            print(f"| {name} | {wall:.1f} | {rate:.0f} | {rate / baseline:.2f} |")


if __name__ == "__main__":
    main()

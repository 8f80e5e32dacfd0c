"""The data plan at cluster scale: start-up time and memory of one rank for N samples.

    python -m bench.data_scale --samples 10000000 [--ranks 64] [--workers 2] [--packing]

Builds (once, cached under `.cache/bench/scale-<N>/`) a synthetic web-like manifest of N samples
(360p-1080p in 16:9, 9:16, 4:3 and 1:1, 2-20 s at 24/25/30 fps, a fifth JPEG images, 1000-2000
samples a shard, plausible offsets and sizes; the tars themselves do not exist), then measures,
each phase in a fresh subprocess so imports and allocator state are honest:

- `cold_start_s`: `DataPlan.open` + the first epoch's plan with no plan cache (deleted first):
  read the manifest, assign buckets, write the per-sample column files, `keys.arrow` and `by_bucket.bin`, shuffle epoch 0.
- `warm_start_s`: the same with the cache present (a real restart: the manifest is not read).
  The page cache is warm (the files were just written); `warm_start_cold_pages_s` repeats it
  after `posix_fadvise(DONTNEED)` on the plan's files (evicts only those files' pages, without
  touching the rest of a shared machine's page cache), as on a node that never read them.
- `next_epoch_s`: computing (and caching) epoch 1's plan in a process that has epoch 0.
- `rss_mib`: RSS of one rank process after set-up: it imports `data.pipeline` (so torch), opens
  the plan and builds the `BatchStream` of dp_rank 0 of `--ranks` and takes its first rows.
  `uss_mib` is the private part of it (see below).
- `worker_rss_mib`: the memory each of `--workers` real `torch.utils.data.DataLoader` workers
  adds: a worker walks that rank's rows and planned batches (`plan.rows`, `plan.batch`, and the
  column look-ups `SampleReader.read` makes: shard, key, offset, size, sizes, media) for a few
  thousand rows without reading any file, and reports from inside itself, from
  /proc/self/smaps_rollup, its Private_Dirty pages: memory it wrote that no other process shares
  and the kernel cannot drop (its own copies of anything). Not RSS: a forked worker shares the
  parent's pages copy-on-write, and every process that maps the plan's files (the column files,
  keys.arrow, by_bucket.bin, the epoch arrays) counts the pages it touched in its RSS, though the
  page cache holds them once per node. Pages of those files that only this worker happened to
  touch are Private_Clean (`worker_mapped_pages_mib`): page cache, clean and reclaimable, not a
  copy. `worker_uss_mib` is the sum of both, `worker_rss_total_mib` the worker's RSS.

Every phase plans with the `sora_like` buckets (conf/buckets/sora_like.yaml at data.fps=24), or
with `--packing` with the packing table that matches them (`sora_like_packing`): the phases are
the same, the plan packs native-size samples instead (its epoch arrays hold packs).

Prints one JSON line. The machine is shared: the load average before and after is in the line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
FPS = 24.0


# --- memory ------------------------------------------------------------------------------


def memory_mib() -> dict[str, float]:
    """This process's RSS, USS (private pages) and peak RSS, in MiB."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":"):
                fields[parts[0][:-1]] = int(parts[1])  # kB
    return {
        "rss": fields["Rss"] / 1024,
        "uss": (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024,
        "dirty": fields["Private_Dirty"] / 1024,
        "clean": fields["Private_Clean"] / 1024,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --- the synthetic manifest ----------------------------------------------------------------


def build_manifest(n: int, folder: Path, chunk: int = 2_000_000) -> Path:
    """A manifest.parquet of `n` synthetic web-like samples in `folder` (once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.manifest import MANIFEST_NAME, SCHEMA

    path = folder / MANIFEST_NAME
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12345)
    per_shard = rng.integers(1000, 2001, size=n // 1000 + 2)
    ends = np.cumsum(per_shard)
    shard_count = int(np.searchsorted(ends, n)) + 1
    per_shard = per_shard[:shard_count]
    per_shard[-1] -= int(ends[shard_count - 1] - n)
    shard_of = np.repeat(np.arange(shard_count, dtype=np.int32), per_shard)  # 4 bytes a sample
    names = pa.array([f"shard-{i:07d}.tar" for i in range(shard_count)])
    heights = np.array([360, 480, 720, 1080])
    aspects = np.array([16 / 9, 9 / 16, 4 / 3, 1.0])
    rates = np.array([24.0, 25.0, 30.0])
    first_of_shard = np.concatenate([[0], np.cumsum(per_shard)])
    shard_start = np.zeros(shard_count, dtype=np.int64)
    written = 0
    tmp = folder / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    started = time.perf_counter()
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        for begin in range(0, n, chunk):
            end = min(n, begin + chunk)
            m = end - begin
            shard = shard_of[begin:end]
            # The position within its shard (shards start at ends - per_shard).
            within = np.arange(begin, end) - first_of_shard[shard]
            height = rng.choice(heights, m, p=[0.3, 0.3, 0.3, 0.1])
            aspect = rng.choice(aspects, m, p=[0.55, 0.25, 0.12, 0.08])
            short = height.astype(np.float64)
            # height is the short side; portrait swaps it.
            width = np.where(aspect >= 1, np.round(short * aspect), short).astype(np.int32)
            tall = np.where(aspect >= 1, short, np.round(short / aspect)).astype(np.int32)
            image = rng.random(m) < 0.2
            fps = np.where(image, 0.0, rng.choice(rates, m))
            duration = np.where(image, 0.0, rng.uniform(2.0, 20.0, m))
            frames = np.where(image, 1, np.maximum(1, np.round(duration * fps))).astype(np.int32)
            pixels = width.astype(np.float64) * tall
            # ~2.5 Mbit/s at 720p for video, ~0.15 bytes a pixel for a JPEG; plus captions.
            size = np.where(
                image,
                pixels * rng.uniform(0.1, 0.25, m),
                duration * pixels * rng.uniform(0.25, 0.45, m),
            )
            size = (np.ceil((size + 1536) / 512) * 512).astype(np.int64)
            # Offsets: each shard's running sum of sizes (multiples of 512, like tar records).
            position = written + np.cumsum(size) - size  # bytes of all earlier samples
            starts = within == 0
            shard_start[shard[starts]] = position[starts]
            offset = position - shard_start[shard]
            written += int(size.sum())
            keys = pa.array(
                [f"{s:07d}/{w:05d}" for s, w in zip(shard.tolist(), within.tolist(), strict=True)]
            )
            table = pa.table(
                {
                    "key": keys,
                    "shard": pa.DictionaryArray.from_arrays(pa.array(shard), names).cast(
                        pa.string()
                    ),
                    "offset": offset,
                    "size": size,
                    "media": pa.DictionaryArray.from_arrays(
                        pa.array(image.astype(np.int8)), pa.array(["mp4", "jpg"])
                    ).cast(pa.string()),
                    "width": width,
                    "height": tall,
                    "frames": frames,
                    "fps": fps,
                    "duration": np.where(image, 0.0, frames / np.maximum(fps, 1)),
                    "has_recaption": rng.random(m) < 0.5,
                },
                schema=SCHEMA,
            )
            writer.write_table(table, row_group_size=1 << 20)
            del table, keys
    os.replace(tmp, path)
    print(
        f"built {n} samples in {shard_count} shards at {path} "
        f"({path.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
    )
    return path


# --- the phases, each in its own process ---------------------------------------------------


def sora_like():
    from omegaconf import OmegaConf

    from data.buckets import BucketConfig, BucketTable
    from model.geometry import LatentGeometry

    values = OmegaConf.merge(
        OmegaConf.structured(BucketConfig), OmegaConf.load(ROOT / "conf/buckets/sora_like.yaml")
    )
    return BucketTable(OmegaConf.to_object(values), LatentGeometry(4, 8, (1, 2, 2)))


def sora_like_packing(**overrides: int | None):
    """The packing table that matches `sora_like` (PackingConfig keys in `overrides` replace
    its settings unless None): a sample keeps at most the largest bucket's tokens and the
    longest bucket's frames, and a sequence holds the token budget, or the largest bucket when
    that is above the budget (sora_like's 121x720x1280 bucket has 111600 tokens, over its 98304
    budget: its batches are within +-15% of it), since packing refuses a sample larger than a
    sequence."""
    from data.packing import PackingConfig, PackingTable

    buckets = sora_like()
    largest = buckets.buckets[0].tokens_per_sample  # most tokens first
    settings = {
        "sequence_tokens": max(buckets.cfg.token_budget, largest),
        "max_tokens_per_sample": largest,
        "max_frames": max(b.frames for b in buckets.buckets),
    }
    settings |= {key: value for key, value in overrides.items() if value is not None}
    return PackingTable(PackingConfig(enabled=True, **settings), buckets.geometry)


def bench_table(packing: bool):
    """The table the phases plan with."""
    return sora_like_packing() if packing else sora_like()


def plan_files(folder: Path) -> list[Path]:
    return [p for p in (folder / ".tessera-plans").rglob("*") if p.is_file()]


def phase_start(folder: Path, evict: bool, packing: bool) -> dict:
    """DataPlan.open + epoch 0's plan (+ epoch 1's, timed apart)."""
    if evict:  # drop only the plan cache's pages
        for path in plan_files(folder):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    started = time.perf_counter()
    from data.plan import DataPlan, DataState

    table = bench_table(packing)
    imported = time.perf_counter()
    plan = DataPlan.open(str(folder), table, FPS)
    opened = time.perf_counter()
    plan.first_batch(DataState(SEED, 0, 0))
    first = time.perf_counter()
    result = {
        "import_s": imported - started,
        "open_s": opened - imported,
        "epoch0_s": first - opened,
        "start_s": first - imported,
        "batches_per_epoch": plan.batches_per_epoch,
        "unassigned": plan.unassigned,
        "buckets_used": int((plan.bucket_counts > 0).sum()),
    }
    for old in plan.folder.glob(f"epoch-s{SEED}-e1-*"):
        shutil.rmtree(old)
    plan.first_batch(DataState(SEED, 1, 0))
    result["next_epoch_s"] = time.perf_counter() - first
    result |= {f"{k}_mib": v for k, v in memory_mib().items()}
    return result


class PlanWalk:
    """What a loader worker does with the plan for `rows` rows, without reading a file: the
    rank's rows split over workers as BatchStream splits them, each planned batch, and each
    sample's column look-ups."""

    def __init__(self, plan, rank: int, world: int, rows: int):
        self.plan, self.rank, self.world, self.rows = plan, rank, world, rows

    def __iter__(self):
        from torch.utils.data import get_worker_info

        from data.plan import DataState

        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        before = memory_mib()
        plan, columns = self.plan, self.plan.columns
        started, samples, walked, checksum = time.perf_counter(), 0, 0, 0
        for row, (epoch, index, _after) in enumerate(
            plan.rows(DataState(SEED, 0, 0), self.rank, self.world)
        ):
            if row >= self.rows:
                break
            if row % workers != worker_id:
                continue
            planned = plan.batch(SEED, epoch, index)
            for sample_id in planned.sample_ids:
                checksum += len(plan.shard(sample_id)) + len(plan.key(sample_id))
                checksum += int(columns["offset"][sample_id]) + int(columns["size"][sample_id])
                checksum += int(columns["height"][sample_id]) + int(columns["width"][sample_id])
                checksum += int(columns["frames"][sample_id]) + len(plan.media(sample_id))
                samples += 1
            walked += 1
        after = memory_mib()
        yield {
            "worker": worker_id,
            "rows": walked,
            "samples": samples,
            "walk_s": time.perf_counter() - started,
            "uss_start_mib": before["uss"],
            "uss_mib": after["uss"],
            "dirty_mib": after["dirty"],
            "clean_mib": after["clean"],
            "rss_mib": after["rss"],
            "checksum": checksum,
        }


def phase_rank(folder: Path, ranks: int, workers: int, rows: int, packing: bool) -> dict:
    """One rank's RSS after set-up, and what each loader worker adds."""
    started = time.perf_counter()
    from torch.utils.data import DataLoader, IterableDataset

    from data.pipeline import BatchStream, DataConfig, open_plan
    from data.plan import DataState

    imported = time.perf_counter()
    base = memory_mib()
    cfg = DataConfig(shards=str(folder), fps=FPS, num_workers=workers)
    plan = open_plan(cfg, bench_table(packing))
    stream = BatchStream(cfg, plan, 0, ranks, DataState(SEED, 0, 0))
    first_rows = stream.rows()
    for _ in range(8):  # the first rows the trainer's process asks for
        epoch, index, _after = next(first_rows)
        plan.batch(SEED, epoch, index)
    set_up = time.perf_counter()
    rank = memory_mib()

    class Walk(PlanWalk, IterableDataset):
        pass

    # Each worker walks `rows` of the rank's rows of epoch 0 (all of them, when fewer).
    walk = Walk(plan, 0, ranks, min(rows * max(1, workers), plan.batches_per_epoch // ranks))
    reports = list(DataLoader(walk, batch_size=None, num_workers=workers))
    return {
        "import_s": imported - started,
        "set_up_s": set_up - imported,
        "rank_import_rss_mib": base["rss"],
        "rss_mib": rank["rss"],
        "uss_mib": rank["uss"],
        "workers": reports,
    }


class OverLimit(RuntimeError):
    pass


def rss_of(pid: int) -> int:
    """Bytes resident in process `pid` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_phase(args: list[str], max_rss: int, module: str = "bench.data_scale") -> dict:
    """A phase of `module` in a fresh process, killed (this one, by its id) if its RSS passes
    `max_rss`, so a build that would not fit cannot push a shared machine into the OOM killer."""
    child = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = 0
    while child.poll() is None:
        peak = max(peak, rss_of(child.pid))
        if peak > max_rss:
            child.kill()
            child.wait()
            raise OverLimit(f"phase {args[1]} passed {max_rss / 2**30:.1f} GiB RSS: killed")
        time.sleep(0.1)
    out = child.stdout.read()
    if child.returncode:
        raise RuntimeError(f"phase {args[1]} failed with exit status {child.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2000, help="rows each loader worker walks")
    parser.add_argument(
        "--packing", action="store_true", help="plan with packing instead of sora_like buckets"
    )
    parser.add_argument(
        "--phase", choices=["cold", "warm", "warm-evicted", "rank"], help="internal"
    )
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-rss-gib", type=float, default=12.0, help="kill a phase whose RSS passes this"
    )
    args = parser.parse_args()
    if args.phase:
        folder = Path(args.folder)
        if args.phase == "rank":
            result = phase_rank(folder, args.ranks, args.workers, args.rows, args.packing)
        else:
            result = phase_start(folder, args.phase == "warm-evicted", args.packing)
        print(json.dumps(result))
        return

    folder = ROOT / ".cache" / "bench" / f"scale-{args.samples}"
    build_manifest(args.samples, folder)
    load_before = os.getloadavg()[0]
    shutil.rmtree(folder / ".tessera-plans", ignore_errors=True)
    common = ["--folder", str(folder), *(["--packing"] if args.packing else [])]
    limit = int(args.max_rss_gib * 2**30)
    try:
        cold = run_phase(["--phase", "cold", *common], limit)
    except OverLimit as error:
        print(json.dumps({"samples": args.samples, "error": str(error)}))
        sys.exit(1)
    warm = run_phase(["--phase", "warm", *common], limit)
    evicted = run_phase(["--phase", "warm-evicted", *common], limit)
    rank = run_phase(
        [
            "--phase",
            "rank",
            *common,
            "--ranks",
            str(args.ranks),
            "--workers",
            str(args.workers),
            "--rows",
            str(args.rows),
        ],
        limit,
    )
    workers = rank["workers"]
    result = {
        "samples": args.samples,
        "packing": args.packing,
        "ranks": args.ranks,
        "workers": args.workers,
        "cold_start_s": round(cold["start_s"], 2),
        "cold_read_assign_s": round(cold["open_s"], 2),
        "cold_peak_rss_mib": round(cold["peak_rss_mib"]),
        "warm_start_s": round(warm["start_s"], 3),
        "warm_start_page_cache": "warm",
        "warm_start_cold_pages_s": round(evicted["start_s"], 3),
        "next_epoch_s": round(warm["next_epoch_s"], 2),
        "rss_mib": round(rank["rss_mib"]),
        "uss_mib": round(rank["uss_mib"]),
        "rank_rss_after_imports_mib": round(rank["rank_import_rss_mib"]),
        "worker_rss_mib": round(max(w["dirty_mib"] for w in workers), 1),
        "worker_mapped_pages_mib": round(max(w["clean_mib"] for w in workers), 1),
        "worker_uss_mib": round(max(w["uss_mib"] for w in workers), 1),
        "worker_uss_at_start_mib": round(max(w["uss_start_mib"] for w in workers), 1),
        "worker_rss_total_mib": round(max(w["rss_mib"] for w in workers)),
        "worker_rows": sum(w["rows"] for w in workers),
        "worker_samples": sum(w["samples"] for w in workers),
        "worker_walk_s": round(max(w["walk_s"] for w in workers), 2),
        "batches_per_epoch": cold["batches_per_epoch"],
        "unassigned": cold["unassigned"],
        "import_s": round(warm["import_s"], 2),
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

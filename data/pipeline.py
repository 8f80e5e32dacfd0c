"""The resumable stream of bucketed video batches.

The data position is one explicit, JSON-serialisable state: `DataState(seed, epoch,
consumed_samples)`. For each epoch a seeded global plan of batches is built that does not
depend on the number of ranks: each bucket's samples are shuffled and cut into batches of
that bucket's size, then the batches are shuffled. Global batch j goes to data-parallel
rank j % world, and `consumed_samples` counts the samples of every plan batch before the
current position, so a run resumes exactly where it stopped, on any number of ranks.

Per-sample randomness (clip start, crop, caption or recaption) is seeded by (seed, epoch,
sample id), so it does not depend on the rank or the loader worker either. Workers take
whole rows of the plan in turn, and the DataLoader returns them in that order.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.buckets import Bucket, BucketTable
from data.decode import DecodeError, decode_clip
from data.shards import INDEX_NAME, index_tar

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    shards: str = ""  # a folder (index.json or *.tar), a glob of tars, or comma-separated URLs
    fps: float = 8.0  # frame rate of the frames fed to the model
    recaption_prob: float = 0.5  # chance of the recaption over the caption, where one exists
    num_workers: int = 2
    seed: int = 0
    cache_dir: str = ".cache/shards"  # where remote shards are copied before reading


@dataclass
class DataState:
    seed: int
    epoch: int
    consumed_samples: int  # samples of this epoch's plan consumed by all ranks together

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DataState:
        return cls(**values)


@dataclass
class Batch:
    video: torch.Tensor  # uint8 (B, T, H, W, 3)
    captions: list[str]
    keys: list[str]
    fps: torch.Tensor  # (B,) frame rate of the sampled frames
    bucket: tuple[int, int, int]  # (frames, height, width)
    state_after: dict  # the DataState once every rank has consumed this batch's row
    skipped: int = 0  # samples that failed to decode since the previous batch


@dataclass(frozen=True)
class PlannedBatch:
    bucket: Bucket
    sample_ids: tuple[int, ...]


# --- the index: every sample's location and metadata ---------------------------------


def _local_shards(spec: str, cache_dir: str) -> list[Path]:
    if "://" in spec:
        return [_fetch(url.strip(), Path(cache_dir)) for url in spec.split(",") if url.strip()]
    if any(c in spec for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec))
        if not paths:
            raise FileNotFoundError(f"data.shards={spec!r}: the glob matches no file")
        return paths
    folder = Path(spec)
    if not spec or not folder.is_dir():
        raise FileNotFoundError(f"data.shards={spec!r}: no such shard folder")
    paths = sorted(folder.glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"data.shards={spec!r}: the folder holds no .tar shards")
    return paths


def _fetch(url: str, cache_dir: Path) -> Path:
    """Copy a remote shard into the cache once; later reads are local seeks."""
    target = cache_dir / url.split("://", 1)[1].replace("/", "_")
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with wds.gopen(url, "rb") as source, open(tmp, "wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
        tmp.replace(target)
    return target


def load_index(spec: str, cache_dir: str = ".cache/shards") -> list[dict]:
    """All samples, each with its shard path; ordered by shard then position."""
    paths = _local_shards(spec, cache_dir)
    index_file = paths[0].parent / INDEX_NAME
    written = {}
    if index_file.exists():
        written = {s["file"]: s["samples"] for s in json.loads(index_file.read_text())["shards"]}
    samples = []
    for path in paths:
        for entry in written.get(path.name) or index_tar(path):
            samples.append({**entry, "shard": str(path)})
    if not samples:
        raise FileNotFoundError(f"data.shards={spec!r}: the shards hold no samples")
    return samples


# --- the plan: a seeded global order of batches, the same on any number of ranks -----


def frames_at_fps(meta: dict, target_fps: float) -> int:
    """How many frames a sample offers at the target frame rate."""
    if meta["frames"] <= 1:
        return 1
    stride = max(1.0, meta["fps"] / target_fps)
    return int((meta["frames"] - 1) // stride) + 1


def plan_epoch(
    samples: list[dict], table: BucketTable, target_fps: float, seed: int, epoch: int
) -> tuple[list[PlannedBatch], int]:
    """This epoch's batches, and how many samples fit no bucket."""
    by_bucket: dict[Bucket, list[int]] = defaultdict(list)
    unassigned = 0
    for sample_id, sample in enumerate(samples):
        meta = sample["meta"]
        bucket = table.assign(meta["width"], meta["height"], frames_at_fps(meta, target_fps))
        if bucket is None:
            unassigned += 1
        else:
            by_bucket[bucket].append(sample_id)
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for bucket in table.buckets:  # a fixed order, so the shuffles below are reproducible
        ids = rng.permutation(by_bucket.get(bucket, []))
        for start in range(0, len(ids) - bucket.batch_size + 1, bucket.batch_size):
            batches.append(
                PlannedBatch(bucket, tuple(int(i) for i in ids[start : start + bucket.batch_size]))
            )
    order = rng.permutation(len(batches))
    return [batches[i] for i in order], unassigned


# --- the stream -------------------------------------------------------------------------


class BatchStream(IterableDataset):
    """One data-parallel rank's batches, from a DataState on, forever."""

    def __init__(
        self,
        cfg: DataConfig,
        table: BucketTable,
        samples: list[dict],
        dp_rank: int,
        dp_world: int,
        state: DataState,
    ):
        self.cfg, self.table, self.samples = cfg, table, samples
        self.dp_rank, self.dp_world, self.state = dp_rank, dp_world, state
        self._plans: dict[int, tuple[list[PlannedBatch], list[int]]] = {}
        self._files: dict[str, object] = {}

    def plan(self, epoch: int) -> tuple[list[PlannedBatch], list[int]]:
        """(batches, cumulative sample counts before each batch) of an epoch, cached."""
        if epoch not in self._plans:
            batches, _ = plan_epoch(self.samples, self.table, self.cfg.fps, self.state.seed, epoch)
            if len(batches) < self.dp_world:
                raise ValueError(
                    f"data.shards={self.cfg.shards!r}: {len(batches)} full batches "
                    f"per epoch, fewer than the {self.dp_world} data-parallel ranks"
                )
            self._plans = {
                epoch: (batches, np.cumsum([0] + [len(b.sample_ids) for b in batches]).tolist())
            }
        return self._plans[epoch]

    def rows(self) -> Iterator[tuple[int, int, DataState]]:
        """(epoch, plan index of this rank's batch, state after the row) for every row on."""
        epoch, consumed = self.state.epoch, self.state.consumed_samples
        while True:
            batches, cumulative = self.plan(epoch)
            first = bisect.bisect_left(cumulative, consumed)
            if first >= len(cumulative) or cumulative[first] != consumed:
                raise ValueError(
                    f"data state consumed_samples={consumed} is not a batch boundary "
                    f"of epoch {epoch}'s plan (seed {self.state.seed})"
                )
            num_rows = (len(batches) - first) // self.dp_world
            for row in range(num_rows):
                end = first + (row + 1) * self.dp_world
                after = (
                    DataState(self.state.seed, epoch + 1, 0)
                    if row == num_rows - 1
                    else DataState(self.state.seed, epoch, cumulative[end])
                )
                yield epoch, end - self.dp_world + self.dp_rank, after
            epoch, consumed = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for row, (epoch, plan_index, after) in enumerate(self.rows()):
            if row % num_workers == worker_id:
                yield self.load(self.plan(epoch)[0][plan_index], epoch, after)

    def _read(self, sample: dict) -> bytes:
        file = self._files.get(sample["shard"])
        if file is None:
            file = self._files[sample["shard"]] = open(sample["shard"], "rb")
        file.seek(sample["offset"])
        return file.read(sample["size"])

    def load(self, planned: PlannedBatch, epoch: int, after: DataState) -> Batch:
        """Decode a planned batch; samples that fail are dropped and counted (the batch may
        come out empty: the loader skips it, and keeps the count)."""
        bucket = planned.bucket
        videos, captions, keys, fps = [], [], [], []
        for sample_id in planned.sample_ids:
            sample = self.samples[sample_id]
            meta = sample["meta"]
            rng = np.random.default_rng([self.state.seed, epoch, sample_id])
            try:
                videos.append(
                    decode_clip(
                        self._read(sample),
                        sample["media"],
                        bucket.frames,
                        self.cfg.fps,
                        (bucket.height, bucket.width),
                        (meta["height"], meta["width"]),
                        rng,
                        sample["key"],
                    )
                )
            except (DecodeError, OSError) as error:
                log.warning("skipping sample %s of %s: %s", sample["key"], sample["shard"], error)
                continue
            use_recaption = meta.get("recaption") and rng.random() < self.cfg.recaption_prob
            captions.append(meta["recaption"] if use_recaption else meta["caption"])
            keys.append(sample["key"])
            fps.append(min(meta["fps"], self.cfg.fps) if meta["frames"] > 1 else self.cfg.fps)
        video = (
            torch.from_numpy(np.stack(videos))
            if videos
            else torch.empty(0, *bucket.shape, 3, dtype=torch.uint8)
        )
        return Batch(
            video,
            captions,
            keys,
            torch.tensor(fps, dtype=torch.float32),
            bucket.shape,
            after.to_dict(),
            skipped=len(planned.sample_ids) - len(keys),
        )


def _skip_empty(batches: Iterator[Batch]) -> Iterator[Batch]:
    skipped = 0
    for batch in batches:
        if not batch.keys:
            skipped += batch.skipped
            continue
        batch.skipped += skipped
        skipped = 0
        yield batch


def build_loader(
    cfg: DataConfig, table: BucketTable, dp_rank: int, dp_world: int, state: DataState
) -> Iterator[Batch]:
    """This rank's endless stream of batches from `state` on."""
    stream = BatchStream(
        cfg, table, load_index(cfg.shards, cfg.cache_dir), dp_rank, dp_world, state
    )
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        prefetch_factor=4 if cfg.num_workers else None,
        persistent_workers=False,
    )
    return _skip_empty(iter(loader))

"""The resumable stream of bucketed video batches.

The data position is one explicit, JSON-serialisable state: `DataState(seed, epoch,
consumed_samples)`. For each epoch a seeded global plan of batches is built that does not
depend on the number of ranks: each bucket's samples are shuffled and cut into batches of
that bucket's size, then the batches are shuffled (with `data.image_share` set, a seeded
choice of image or video batches is left out first, so that images make that share of the
batches: joint image and video training at a chosen mix). From the current position the plan is
read in rows of `world` batches, rank r taking the r-th of each row (batch j goes to rank
j % world in a fresh epoch), and `consumed_samples` counts the samples of every plan batch
before the position, so a run resumes exactly where it stopped, on any number of ranks.
An epoch ends when fewer than `world` batches are left.

Per-sample randomness (clip start, crop, caption or recaption) is seeded by (seed, epoch,
sample id), so it does not depend on the rank or the loader worker either; with
`data.augment=false` a clip is always its middle frames and centre crop. Workers take
whole rows of the plan in turn, and the DataLoader returns them in that order.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import logging
import os
import shlex
import shutil
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.buckets import Bucket, BucketTable
from data.decode import DecodeError, decode_clip
from data.lru import ByteLRU
from data.shards import INDEX_NAME, index_tar

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    shards: str = ""  # a folder (index.json or *.tar), a glob of tars, or comma-separated URLs
    fps: float = 8.0  # frame rate of the frames fed to the model
    recaption_prob: float = 0.5  # chance of the recaption over the caption, where one exists
    num_workers: int = 2
    seed: int = 0
    # Share of each epoch's batches that hold images (1-frame buckets); null keeps the data's own
    # mix. Batches, not samples: every batch has the same token budget, so this is the share of
    # compute, whereas an image batch holds many more samples than a video batch.
    image_share: float | None = None
    cache_dir: str = ".cache/shards"  # where remote shards are copied before reading
    # A random clip start and crop each epoch; false: the middle frames and the centre crop, so a
    # sample decodes to the same pixels every epoch (and train.encoding_cache_mb can keep its
    # latents).
    augment: bool = True
    # > 0, with augment=false: each loader process keeps up to this many MiB of decoded clips,
    # so later epochs of a small dataset skip decoding
    decoded_cache_mb: int = 0


@dataclass
class DataState:
    seed: int
    epoch: int
    consumed_samples: int  # samples of this epoch's plan consumed by all ranks together

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DataState:
        names = {f.name for f in fields(cls)}
        if set(values) != names:
            raise ValueError(f"data state {values}: expected exactly the keys {sorted(names)}")
        return cls(**{name: int(values[name]) for name in names})


@dataclass
class Batch:
    video: torch.Tensor  # uint8 (B, T, H, W, 3)
    captions: list[str]
    keys: list[str]
    fps: torch.Tensor  # (B,) frame rate of the sampled frames
    native_size: torch.Tensor  # (B, 2) the sources' (height, width) before resizing and cropping
    bucket: tuple[int, int, int]  # (frames, height, width)
    state_after: dict  # the DataState once every rank has consumed this batch's row
    skipped: int = 0  # samples that failed to decode since the previous batch
    epoch: int = 0  # with plan_index, names this batch in the global plan: training seeds
    plan_index: int = 0  # its noise from it, so randomness follows the data, not the rank

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True) for fast, asynchronous host-to-GPU copies."""
        return replace(
            self,
            video=self.video.pin_memory(),
            fps=self.fps.pin_memory(),
            native_size=self.native_size.pin_memory(),
        )


@dataclass(frozen=True)
class PlannedBatch:
    bucket: Bucket
    sample_ids: tuple[int, ...]


# --- the index: every sample's location and metadata ---------------------------------


def shard_paths(spec: str, cache_dir: str | Path) -> list[Path]:
    """Local tar paths of `data.shards`: comma-separated folders, globs, tar paths and URLs
    (remote shards are copied into `cache_dir` first)."""
    entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if not entries:
        raise FileNotFoundError("data.shards is empty: give a shard folder, a glob or tar paths")
    paths: list[Path] = []
    for entry in entries:
        if "://" in entry:
            paths.append(_fetch(entry, Path(cache_dir)))
        elif any(c in entry for c in "*?["):
            matched = sorted(Path(p) for p in glob.glob(entry) if p.endswith(".tar"))
            if not matched:
                raise FileNotFoundError(f"data.shards={spec!r}: {entry!r} matches no .tar file")
            paths += matched
        elif Path(entry).is_dir():
            tars = sorted(Path(entry).glob("*.tar"))
            if not tars:
                raise FileNotFoundError(f"data.shards={spec!r}: folder {entry} holds no .tar")
            paths += tars
        elif Path(entry).is_file():
            paths.append(Path(entry))
        else:
            raise FileNotFoundError(f"data.shards={spec!r}: no such shard folder or file {entry}")
    return paths


def _fetch(url: str, cache_dir: Path) -> Path:
    """Copy a remote shard into the cache once (atomically, as ranks may race); later reads
    are local seeks."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:12]
    target = cache_dir / f"{digest}-{Path(urlparse(url).path).name}"
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # webdataset's gopen has no s3 scheme; its documented route is the AWS CLI.
        source = f"pipe:aws s3 cp {shlex.quote(url)} -" if url.startswith("s3://") else url
        tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
        with wds.gopen(source, "rb") as reader, open(tmp, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
        tmp.replace(target)
    return target


def load_index(spec: str, cache_dir: str | Path = ".cache/shards") -> list[dict]:
    """All samples, each with its shard path; ordered by shard then position. A shard is
    looked up in the index.json beside it, or indexed by scanning its tar headers."""
    written: dict[Path, dict[str, list[dict]]] = {}  # folder -> shard file name -> samples
    samples = []
    for path in shard_paths(spec, cache_dir):
        if path.parent not in written:
            index_file = path.parent / INDEX_NAME
            shards = json.loads(index_file.read_text())["shards"] if index_file.exists() else []
            written[path.parent] = {shard["file"]: shard["samples"] for shard in shards}
        for entry in written[path.parent].get(path.name) or index_tar(path):
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


def assign_buckets(
    samples: list[dict], table: BucketTable, target_fps: float
) -> tuple[dict[Bucket, list[int]], int]:
    """Sample ids by bucket (the same every epoch, so computed once), and how many samples
    fit no bucket."""
    by_bucket: dict[Bucket, list[int]] = defaultdict(list)
    unassigned = 0
    for sample_id, sample in enumerate(samples):
        meta = sample["meta"]
        bucket = table.assign(meta["width"], meta["height"], frames_at_fps(meta, target_fps))
        if bucket is None:
            unassigned += 1
        else:
            by_bucket[bucket].append(sample_id)
    return by_bucket, unassigned


def shuffle_plan(
    by_bucket: dict[Bucket, list[int]],
    table: BucketTable,
    seed: int,
    epoch: int,
    image_share: float | None = None,
) -> list[PlannedBatch]:
    """One epoch's batches: each bucket shuffled and cut (dropping a last, partial batch), then,
    with `image_share`, image or video batches left out to make images that share of them, then
    the batches shuffled; all seeded by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for bucket in table.buckets:  # a fixed order, so the shuffles below are reproducible
        ids = rng.permutation(by_bucket.get(bucket, []))
        for start in range(0, len(ids) - bucket.batch_size + 1, bucket.batch_size):
            batches.append(
                PlannedBatch(bucket, tuple(int(i) for i in ids[start : start + bucket.batch_size]))
            )
    if image_share is not None:
        batches = _mix_images(batches, image_share, rng)
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def _mix_images(
    batches: list[PlannedBatch], share: float, rng: np.random.Generator
) -> list[PlannedBatch]:
    """A seeded subset in which image batches are `share` of all: the scarcer kind is kept whole."""
    images = [b for b in batches if b.bucket.frames == 1]
    videos = [b for b in batches if b.bucket.frames > 1]
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"data.image_share={share}: must be in [0, 1]")
    if (share > 0 and not images) or (share < 1 and not videos):
        raise ValueError(
            f"data.image_share={share}: the plan has {len(images)} image and {len(videos)} "
            "video batches, so that share cannot be met"
        )
    if share in (0.0, 1.0):
        keep_images, keep_videos = (len(images), 0) if share == 1.0 else (0, len(videos))
    elif len(images) * (1 - share) > len(videos) * share:  # too many images
        keep_images, keep_videos = round(len(videos) * share / (1 - share)), len(videos)
    else:
        keep_images, keep_videos = len(images), round(len(images) * (1 - share) / share)

    def chosen(kind: list[PlannedBatch], count: int) -> list[PlannedBatch]:
        return [kind[i] for i in sorted(rng.permutation(len(kind))[:count])]

    return chosen(images, keep_images) + chosen(videos, keep_videos)


def plan_epoch(
    samples: list[dict],
    table: BucketTable,
    target_fps: float,
    seed: int,
    epoch: int,
    image_share: float | None = None,
) -> tuple[list[PlannedBatch], int]:
    """This epoch's batches, and how many samples fit no bucket."""
    by_bucket, unassigned = assign_buckets(samples, table, target_fps)
    return shuffle_plan(by_bucket, table, seed, epoch, image_share), unassigned


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
        self.by_bucket, self.unassigned = assign_buckets(samples, table, cfg.fps)
        self.batches_per_epoch = sum(
            len(ids) // bucket.batch_size for bucket, ids in self.by_bucket.items()
        )
        self._plans: dict[int, tuple[list[PlannedBatch], list[int]]] = {}
        self._files: dict[str, BinaryIO] = {}
        self._decoded = ByteLRU(cfg.decoded_cache_mb * 2**20)
        # A bad state fails here, in the trainer's process, not later inside a worker.
        self.first_batch(state.epoch, state.consumed_samples)

    def plan(self, epoch: int) -> tuple[list[PlannedBatch], list[int]]:
        """(batches, cumulative sample counts before each batch) of an epoch; the latest
        epoch's is kept."""
        if epoch not in self._plans:
            batches = shuffle_plan(
                self.by_bucket, self.table, self.state.seed, epoch, self.cfg.image_share
            )
            cumulative = np.cumsum([0] + [len(b.sample_ids) for b in batches]).tolist()
            self._plans = {epoch: (batches, cumulative)}
        return self._plans[epoch]

    def first_batch(self, epoch: int, consumed: int) -> int:
        """The plan index after `consumed` samples of an epoch."""
        cumulative = self.plan(epoch)[1]
        first = bisect.bisect_left(cumulative, consumed)
        if first >= len(cumulative) or cumulative[first] != consumed:
            raise ValueError(
                f"data state consumed_samples={consumed} is not a batch boundary "
                f"of epoch {epoch}'s plan (seed {self.state.seed})"
            )
        return first

    def rows(self) -> Iterator[tuple[int, int, DataState]]:
        """(epoch, plan index of this rank's batch, state after the row) for every row on."""
        epoch, consumed = self.state.epoch, self.state.consumed_samples
        while True:
            first = self.first_batch(epoch, consumed)
            batches, cumulative = self.plan(epoch)
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
                yield self.load(self.plan(epoch)[0][plan_index], epoch, plan_index, after)

    def _read(self, sample: dict) -> bytes:
        file = self._files.get(sample["shard"])
        if file is None:
            file = self._files[sample["shard"]] = open(sample["shard"], "rb")
        file.seek(sample["offset"])
        return file.read(sample["size"])

    def _decode(self, sample_id: int, bucket: Bucket, rng: np.random.Generator) -> np.ndarray:
        """One sample's frames; without augmentation, from the decoded-clip cache if it has them."""
        key = (sample_id, bucket.shape)
        cached = not self.cfg.augment and self._decoded.max_bytes > 0
        clip = self._decoded.get(key) if cached else None
        if clip is None:
            sample, meta = self.samples[sample_id], self.samples[sample_id]["meta"]
            clip = decode_clip(
                self._read(sample),
                sample["media"],
                bucket.frames,
                self.cfg.fps,
                (bucket.height, bucket.width),
                (meta["height"], meta["width"]),
                rng if self.cfg.augment else None,
                sample["key"],
            )
            if cached:
                self._decoded.put(key, clip, clip.nbytes)
        return clip

    def load(self, planned: PlannedBatch, epoch: int, plan_index: int, after: DataState) -> Batch:
        """Decode a planned batch; samples that fail are dropped and counted (the batch may
        come out empty: the loader skips it, and keeps the count)."""
        bucket = planned.bucket
        videos, captions, keys, fps, native_sizes = [], [], [], [], []
        for sample_id in planned.sample_ids:
            sample = self.samples[sample_id]
            meta = sample["meta"]
            rng = np.random.default_rng([self.state.seed, epoch, sample_id])
            try:
                videos.append(self._decode(sample_id, bucket, rng))
            except (DecodeError, OSError) as error:
                log.warning("skipping sample %s of %s: %s", sample["key"], sample["shard"], error)
                continue
            use_recaption = meta.get("recaption") and rng.random() < self.cfg.recaption_prob
            captions.append(meta["recaption"] if use_recaption else meta["caption"])
            keys.append(sample["key"])
            fps.append(min(meta["fps"], self.cfg.fps) if meta["frames"] > 1 else self.cfg.fps)
            native_sizes.append((meta["height"], meta["width"]))
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
            torch.tensor(native_sizes, dtype=torch.float32).reshape(-1, 2),
            bucket.shape,
            after.to_dict(),
            skipped=len(planned.sample_ids) - len(keys),
            epoch=epoch,
            plan_index=plan_index,
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


def training_stream(
    cfg: DataConfig, table: BucketTable, dp_rank: int, dp_world: int, state: DataState
) -> BatchStream:
    """This rank's stream of training batches; every rank needs a batch in every row."""
    stream = BatchStream(
        cfg, table, load_index(cfg.shards, cfg.cache_dir), dp_rank, dp_world, state
    )
    if stream.batches_per_epoch < dp_world:
        raise ValueError(
            f"data.shards={cfg.shards!r}: {stream.batches_per_epoch} full batches per "
            f"epoch, fewer than the {dp_world} data-parallel ranks"
        )
    return stream


def build_loader(
    cfg: DataConfig, table: BucketTable, dp_rank: int, dp_world: int, state: DataState
) -> Iterator[Batch]:
    """This rank's endless stream of batches from `state` on."""
    stream = training_stream(cfg, table, dp_rank, dp_world, state)
    log.info(
        "%d samples, %d of them in no bucket; %d batches an epoch in %d buckets",
        len(stream.samples),
        stream.unassigned,
        stream.batches_per_epoch,
        len(stream.by_bucket),
    )
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        prefetch_factor=4 if cfg.num_workers else None,
        pin_memory=torch.cuda.is_available(),
    )
    return _skip_empty(iter(loader))

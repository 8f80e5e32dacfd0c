"""The resumable stream of bucketed video batches: a `DataPlan` (which samples, in which
batches, in which order; `data/plan.py`) read by a `SampleReader` (the bytes; `data/reader.py`)
and decoded.

Each rank reads its batches of the global plan (see `data/plan.py`: the same plan on any number
of ranks, and a `DataState` that resumes exactly on any number). Workers take whole rows of the
plan in turn, and the DataLoader returns them in that order, each batch's tensors in one
shared-memory block per dtype (`one_block_per_dtype`). Each worker keeps up to
`data.read_ahead` sample reads in flight ahead of the sample it decodes, so the latency of an
object store hides behind decoding. A read is retried with backoff; a sample that still cannot
be read, or cannot be decoded, is skipped and counted in the next batch's `skipped`, while
`data.max_failed_reads` unreadable samples in a row stop the run with the shard's URL (a store
that went away is no dataset to skip through).

Per-sample randomness (clip start, crop, caption or recaption) is seeded by (seed, epoch,
sample key), so it depends neither on the rank or the loader worker nor on where the sample sits
in its manifest; with `data.augment=false` a clip is always its middle frames and centre crop.

Latent shards (`python -m train.encode`, data/latents.py) are read the same way, by the same
plan: a batch of them carries the stored latents and caption embeddings (one `LatentBatch`)
instead of pixels, the caption or recaption chosen by the same draw.

With packing (data/packing.py) a planned batch is a rank's packs: each sample is cut to its own
target shape, and the loader yields a `PackedBatch` whose samples come in groups of one shape
(each an ordinary `Batch`, so that the encoders take a group at once).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, is_dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.buckets import Bucket, BucketTable
from data.decode import DecodeError, decode_clip
from data.latents import LATENT_MEDIA, LatentBatch, LatentSample, read_sample
from data.lru import ByteLRU
from data.packing import PackingTable
from data.plan import DataPlan, DataState, PlannedBatch
from data.reader import RawSample, SampleError, SampleReader
from data.storage import ReadError

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    # Comma-separated shard folders or URL prefixes (s3://, gs://, http(s)://) holding a
    # manifest.parquet, manifest files, or tars and globs of tars of such folders
    shards: str = ""
    fps: float = 8.0  # frame rate of the frames fed to the model
    recaption_prob: float = 0.5  # chance of the recaption over the caption, where one exists
    num_workers: int = 2
    seed: int = 0
    # Share of each epoch's batches that hold images (1-frame buckets); null keeps the data's own
    # mix. Batches, not samples: every batch has the same token budget, so this is the share of
    # compute, whereas an image batch holds many more samples than a video batch.
    image_share: float | None = None
    # The plan's cache when the manifest's folder is remote or read-only, and data.cache_mb's
    cache_dir: str = ".cache/data"
    # > 0: remote samples are kept on local disk up to this many MiB per node (least recently
    # used out), for small datasets read for many epochs
    cache_mb: int = 0
    read_ahead: int = 16  # sample reads each loader worker keeps in flight
    read_retries: int = 3  # retries of a failed read, with exponential backoff
    read_backoff_s: float = 0.5  # the first retry's wait
    max_failed_reads: int = 64  # unreadable samples in a row that stop the run
    # A loader process stops the run, naming the commonest reasons, when more than this share of
    # its last `skipped_window` samples could not be read or decoded: a healthy web dataset
    # loses a few percent; data that mostly fails (a wrong path, a codec the decoder lacks)
    # would otherwise train on what is left without a word.
    max_skipped_share: float = 0.25
    skipped_window: int = 512
    # A random clip start and crop each epoch; false: the middle frames and the centre crop, so a
    # sample decodes to the same pixels every epoch (and train.encoding_cache_mb can keep its
    # latents).
    augment: bool = True
    # > 0, with augment=false: each loader process keeps up to this many MiB of decoded clips,
    # so later epochs of a small dataset skip decoding
    decoded_cache_mb: int = 0


@dataclass
class Batch:
    video: torch.Tensor | None  # uint8 (B, T, H, W, 3); None in a batch of latent shards
    captions: list[str]
    keys: list[str]
    fps: torch.Tensor  # (B,) frame rate of the sampled frames
    native_size: torch.Tensor  # (B, 2) the sources' (height, width) before resizing and cropping
    bucket: tuple[int, int, int]  # (frames, height, width)
    state_after: dict  # the DataState once every rank has consumed this batch's row
    skipped: int = 0  # samples that failed to read or decode since the previous batch
    epoch: int = 0  # with plan_index, names this batch in the global plan: training seeds
    plan_index: int = 0  # its noise from it, so randomness follows the data, not the rank
    latents: LatentBatch | None = None  # from latent shards, instead of the video
    read_retries: int = 0  # remote reads retried since the previous batch
    read_wait_s: float = 0.0  # and the seconds those retries waited

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True) for fast, asynchronous host-to-GPU copies."""
        pinned = {
            name: getattr(self, name).pin_memory()
            for name in ("video", "fps", "native_size", "latents")
            if getattr(self, name) is not None
        }
        return replace(self, **pinned)


@dataclass
class PackedBatch:
    """One rank's packs for a micro-step: its samples grouped by shape, in the order of their
    first appearance in the packs. `sequence_length` is the tokens the packs hold together
    (packs x packing.sequence_tokens): the DiT pads the samples' tokens to it."""

    groups: list[Batch]
    sequence_length: int
    state_after: dict
    skipped: int = 0
    epoch: int = 0
    plan_index: int = 0
    read_retries: int = 0
    read_wait_s: float = 0.0

    @property
    def keys(self) -> list[str]:
        return [key for group in self.groups for key in group.keys]

    @property
    def captions(self) -> list[str]:
        return [caption for group in self.groups for caption in group.captions]

    @property
    def fps(self) -> torch.Tensor:
        return torch.cat([group.fps for group in self.groups])

    @property
    def native_size(self) -> torch.Tensor:
        return torch.cat([group.native_size for group in self.groups])

    def pin_memory(self) -> PackedBatch:
        return replace(self, groups=[group.pin_memory() for group in self.groups])


def decode_planned(
    plan: DataPlan,
    sample_id: int,
    raw: RawSample,
    bucket: Bucket,
    fps: float,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """A planned sample's frames at its bucket's size, with a random start and crop, or with
    `rng` None the middle frames and the centre crop."""
    columns = plan.columns
    return decode_clip(
        raw.media,
        plan.media(sample_id),
        bucket.frames,
        fps,
        (bucket.height, bucket.width),
        (int(columns["height"][sample_id]), int(columns["width"][sample_id])),
        rng,
        raw.key,
    )


def sample_seed(key: str) -> int:
    """A sample's own seed, from its key: the same in every manifest that holds it."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def open_plan(cfg: DataConfig, table: BucketTable | PackingTable) -> DataPlan:
    """The plan of `data.shards`, built once per run and shared."""
    return DataPlan.open(cfg.shards, table, cfg.fps, cfg.image_share, cfg.cache_dir)


class BatchStream(IterableDataset):
    """One data-parallel rank's batches, from a DataState on, forever."""

    def __init__(
        self, cfg: DataConfig, plan: DataPlan, dp_rank: int, dp_world: int, state: DataState
    ):
        self.cfg, self.plan = cfg, plan
        self.dp_rank, self.dp_world, self.state = dp_rank, dp_world, state
        self.reader = SampleReader(
            plan,
            cfg.read_retries,
            cfg.read_backoff_s,
            cfg.cache_dir,
            cfg.cache_mb,
            retry_seed=state.seed * 100_003 + dp_rank,  # each rank's readers wait their own
        )
        self._decoded = ByteLRU(cfg.decoded_cache_mb * 2**20)
        self._failed_reads = 0  # in a row
        self.skips = SkipGuard(cfg.max_skipped_share, cfg.skipped_window)
        # A bad state fails here, in the trainer's process, not later inside a worker.
        plan.first_batch(state)

    def rows(self) -> Iterator[tuple[int, int, DataState]]:
        """(epoch, plan index of this rank's batch, state after the row) for every row on."""
        return self.plan.rows(self.state, self.dp_rank, self.dp_world)

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        mine = (
            (epoch, index, after)
            for row, (epoch, index, after) in enumerate(self.rows())
            if row % num_workers == worker_id
        )
        for (epoch, index, after), planned, reads in self._read_ahead(mine):
            batch = self.load(planned, epoch, index, after, reads)
            self.skips.observe(len(batch.keys), batch.skipped)
            yield one_block_per_dtype(batch) if worker else batch

    def _read_ahead(self, rows: Iterator[tuple[int, int, DataState]]):
        """(row, planned batch, its reads) in order, each yielded once `read_ahead` reads of
        later batches are in flight behind it (or `read_ahead` batches wait behind it, when the
        decoded-clip cache leaves little to read)."""
        pending: deque = deque()
        ahead = 0  # reads submitted after the front batch's
        pool = ThreadPoolExecutor(max(1, self.cfg.read_ahead), thread_name_prefix="read")
        try:
            for epoch, index, after in rows:
                planned = self.plan.batch(self.state.seed, epoch, index)
                reads = [
                    None
                    if self._cached(i, planned.shape_of(position))
                    else pool.submit(self.reader.read, i)
                    for position, i in enumerate(planned.sample_ids)
                ]
                if pending:
                    ahead += sum(read is not None for read in reads)
                pending.append(((epoch, index, after), planned, reads))
                while len(pending) > 1 and max(ahead, len(pending) - 1) >= self.cfg.read_ahead:
                    yield pending.popleft()
                    ahead -= sum(read is not None for read in pending[0][2])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _cached(self, sample_id: int, bucket: Bucket) -> bool:
        return self._caching and (sample_id, bucket.shape) in self._decoded

    @property
    def _caching(self) -> bool:
        return not self.cfg.augment and self._decoded.max_bytes > 0

    def _sample(
        self, sample_id: int, read: Future | None, bucket: Bucket, rng: np.random.Generator
    ) -> tuple[np.ndarray | LatentSample, dict]:
        """One sample's frames (or stored latents) and metadata; without augmentation, frames
        from the decoded-clip cache if it has them."""
        key = (sample_id, bucket.shape)
        cached = self._decoded.get(key) if self._caching else None
        if cached is not None:
            return cached
        raw = self._fetch(sample_id, read)
        if self.plan.media(sample_id) == LATENT_MEDIA:
            if raw.meta.get("bucket") != list(bucket.shape):
                raise DecodeError(
                    f"sample {raw.key} was encoded for bucket {raw.meta.get('bucket')}, "
                    f"not the planned {list(bucket.shape)}"
                )
            return read_sample(raw.media, raw.key), raw.meta
        clip = decode_planned(
            self.plan, sample_id, raw, bucket, self.cfg.fps, rng if self.cfg.augment else None
        )
        if self._caching:
            self._decoded.put(key, (clip, raw.meta), clip.nbytes)
        return clip, raw.meta

    def _fetch(self, sample_id: int, read: Future | None) -> RawSample:
        """The sample's bytes; after `max_failed_reads` unreadable samples in a row, an error
        that stops the run."""
        try:
            raw = read.result() if read is not None else self.reader.read(sample_id)
        except ReadError as error:
            self._failed_reads += 1
            if self._failed_reads >= self.cfg.max_failed_reads:
                raise OSError(
                    f"{self._failed_reads} samples in a row could not be read "
                    f"(data.max_failed_reads), the last: {error}"
                ) from error
            raise
        self._failed_reads = 0
        return raw

    def load(
        self,
        planned: PlannedBatch,
        epoch: int,
        plan_index: int,
        after: DataState,
        reads: list[Future | None] | None = None,
    ) -> Batch | PackedBatch:
        """Read and decode a planned batch; samples that fail are dropped and counted (the batch
        may come out empty: the loader skips it, and keeps the count)."""
        reads = reads or [None] * len(planned.sample_ids)
        loaded = [
            self._load_sample(sample_id, read, planned.shape_of(position), epoch)
            for position, (sample_id, read) in enumerate(
                zip(planned.sample_ids, reads, strict=True)
            )
        ]
        skipped = loaded.count(None)
        retries, waited_s = self.reader.ranges.take_retry_counts()
        if planned.bucket is not None:
            samples = [sample for sample in loaded if sample is not None]
            batch = _batch(samples, planned.bucket, after.to_dict(), skipped, epoch, plan_index)
            return replace(batch, read_retries=retries, read_wait_s=waited_s)
        by_shape: dict[Bucket, list[_Loaded]] = {}
        for position, sample in enumerate(loaded):
            if sample is not None:
                by_shape.setdefault(planned.shapes[position], []).append(sample)
        groups = [
            _batch(samples, shape, {}, 0, epoch, plan_index) for shape, samples in by_shape.items()
        ]
        sequence = len(planned.pack_sizes) * self.plan.packing.cfg.sequence_tokens
        return PackedBatch(
            groups, sequence, after.to_dict(), skipped, epoch, plan_index, retries, waited_s
        )

    def _load_sample(
        self, sample_id: int, read: Future | None, bucket: Bucket, epoch: int
    ) -> _Loaded | None:
        """One sample cut to `bucket`'s shape, its caption drawn; None (and a warning) when it
        cannot be read or decoded."""
        columns = self.plan.columns
        key = self.plan.key(sample_id)
        rng = np.random.default_rng([self.state.seed, epoch, sample_seed(key)])
        try:
            item, meta = self._sample(sample_id, read, bucket, rng)
            use_recaption = meta.get("recaption") and rng.random() < self.cfg.recaption_prob
            field = "recaption" if use_recaption else "caption"
            if isinstance(item, LatentSample):
                item = (item, _stored_field(item, field, key))
        except (DecodeError, SampleError, ReadError) as error:
            shard = self.plan.shard(sample_id)
            log.warning("skipping sample %s of %s: %s", key, shard, error)
            reason = str(error).replace(key, "<sample>").replace(shard, "<shard>")
            self.skips.reasons[f"{type(error).__name__}: {reason}"] += 1
            return None
        frames, source_fps = int(columns["frames"][sample_id]), float(columns["fps"][sample_id])
        return _Loaded(
            item,
            meta[field],
            key,
            min(source_fps, self.cfg.fps) if frames > 1 else self.cfg.fps,
            (int(columns["height"][sample_id]), int(columns["width"][sample_id])),
        )


@dataclass
class _Loaded:
    item: np.ndarray | tuple[LatentSample, str]  # frames, or stored latents and caption field
    caption: str
    key: str
    fps: float
    native_size: tuple[int, int]


def _batch(
    samples: list[_Loaded], bucket: Bucket, after: dict, skipped: int, epoch: int, plan_index: int
) -> Batch:
    """Samples of one shape as a Batch."""
    latents = [s.item for s in samples if isinstance(s.item, tuple)]
    if latents:
        video = None
    elif samples:
        video = torch.from_numpy(np.stack([s.item for s in samples]))
    else:  # every sample failed: the loader skips the batch and keeps the count
        video = torch.empty(0, *bucket.shape, 3, dtype=torch.uint8)
    return Batch(
        video,
        [s.caption for s in samples],
        [s.key for s in samples],
        torch.tensor([s.fps for s in samples], dtype=torch.float32),
        torch.tensor([s.native_size for s in samples], dtype=torch.float32).reshape(-1, 2),
        bucket.shape,
        after,
        skipped=skipped,
        epoch=epoch,
        plan_index=plan_index,
        latents=LatentBatch.stack(latents) if latents else None,
    )


def _stored_field(sample: LatentSample, field: str, key: str) -> str:
    """The caption field the draw chose, which the sample must store an embedding of."""
    if field not in sample.text:
        raise DecodeError(f"sample {key} has a {field} but no stored embedding of it")
    return field


def one_block_per_dtype(batch: Batch | PackedBatch) -> Batch | PackedBatch:
    """The batch with its tensors copied into one buffer per dtype, as views of it. A loader
    worker hands each tensor storage over in its own shared-memory segment, whose file
    descriptor crosses a socket (about 0.2 ms a storage, on both sides): one segment per dtype
    keeps that cost flat, however many shape groups and tensors a packed batch holds."""
    tensors: list[torch.Tensor] = []
    _map_tensors(batch, lambda tensor: tensors.append(tensor) or tensor)
    views: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in {tensor.dtype for tensor in tensors}:
        positions = [i for i, tensor in enumerate(tensors) if tensor.dtype == dtype]
        if len(positions) == 1:  # a bucketed batch's frames: already one block, copy nothing
            views[positions[0]] = tensors[positions[0]]
            continue
        block = torch.cat([tensors[i].reshape(-1) for i in positions])
        pieces = block.split([tensors[i].numel() for i in positions])
        for i, piece in zip(positions, pieces, strict=True):
            views[i] = piece.view(tensors[i].shape)
    placed = iter(views)
    return _map_tensors(batch, lambda tensor: next(placed))


def _map_tensors(value, function):
    """`value` (a tensor, or dataclasses and lists holding tensors) with every tensor t replaced
    by function(t), in a fixed order."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, list):
        return [_map_tensors(item, function) for item in value]
    if is_dataclass(value):
        changed = {f.name: _map_tensors(getattr(value, f.name), function) for f in fields(value)}
        return replace(value, **changed)
    return value


class SkippedTooMany(RuntimeError):
    """Most of the data cannot be used: the run stops rather than train on the rest."""


class SkipGuard:
    """The share of samples skipped over a loader's last `window` samples (kept and skipped),
    and why they were; past `max_share`, SkippedTooMany naming the commonest reasons."""

    def __init__(self, max_share: float, window: int):
        self.max_share, self.window = max_share, window
        self.recent: deque[tuple[int, int]] = deque()  # (kept, skipped) of the latest batches
        self.kept = self.skipped = 0
        self.reasons: Counter[str] = Counter()

    def observe(self, kept: int, skipped: int) -> None:
        self.recent.append((kept, skipped))
        self.kept, self.skipped = self.kept + kept, self.skipped + skipped
        while self.kept + self.skipped - sum(self.recent[0]) >= self.window:
            old_kept, old_skipped = self.recent.popleft()
            self.kept, self.skipped = self.kept - old_kept, self.skipped - old_skipped
        seen = self.kept + self.skipped
        if seen >= self.window and self.skipped > self.max_share * seen:
            commonest = "; ".join(f"{why} ({n}x)" for why, n in self.reasons.most_common(3))
            raise SkippedTooMany(
                f"{self.skipped} of the last {seen} samples could not be read or decoded, more "
                f"than data.max_skipped_share={self.max_share} of data.skipped_window="
                f"{self.window}; the commonest reasons: {commonest}"
            )


def _skip_empty(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Batches with samples; an empty one's counts go to the next."""
    skipped, retries, waited_s = 0, 0, 0.0
    for batch in batches:
        if not batch.keys:
            skipped += batch.skipped
            retries += batch.read_retries
            waited_s += batch.read_wait_s
            continue
        batch.skipped += skipped
        batch.read_retries += retries
        batch.read_wait_s += waited_s
        skipped, retries, waited_s = 0, 0, 0.0
        yield batch


def training_stream(
    cfg: DataConfig, plan: DataPlan, dp_rank: int, dp_world: int, state: DataState
) -> BatchStream:
    """This rank's stream of training batches; every rank needs a batch in every row."""
    if plan.batches_per_epoch < dp_world:
        raise ValueError(
            f"data.shards={cfg.shards!r}: {plan.batches_per_epoch} full batches per "
            f"epoch, fewer than the {dp_world} data-parallel ranks"
        )
    return BatchStream(cfg, plan, dp_rank, dp_world, state)


def build_loader(
    cfg: DataConfig, plan: DataPlan, dp_rank: int, dp_world: int, state: DataState
) -> Iterator[Batch]:
    """This rank's endless stream of batches from `state` on."""
    stream = training_stream(cfg, plan, dp_rank, dp_world, state)
    if dp_rank == 0:  # one rank checks, so a store is not asked once per rank
        stream.reader.check_shards()
    log.info(
        "%d samples, %d of them in no %s; %d batches an epoch of %d %s",
        plan.num_samples,
        plan.unassigned,
        "bucket" if plan.packing is None else "target shape",
        plan.batches_per_epoch,
        int((plan.bucket_counts > 0).sum()),
        "buckets" if plan.packing is None else "target shapes, packed",
    )
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        prefetch_factor=4 if cfg.num_workers else None,
        pin_memory=torch.cuda.is_available(),
        # Worker seeds come from here, not from the global generator, so building a loader
        # leaves the training randomness (seeded, or restored from a checkpoint) untouched.
        generator=torch.Generator().manual_seed(state.seed),
    )
    return _skip_empty(iter(loader))

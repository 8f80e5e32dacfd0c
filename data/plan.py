"""The data plan: which samples make which batch, in which order, epoch after epoch. Pure: it
reads the manifests and nothing else (the sample reader fetches the samples).

The data position is one explicit, JSON-serialisable state: `DataState(seed, epoch,
consumed_samples)`. For each epoch a seeded global plan of batches is built that does not
depend on the number of ranks: each bucket's samples are shuffled and cut into batches of
that bucket's size, then the batches are shuffled (with `image_share` set, a seeded choice of
image or video batches is left out first, so that images make that share of the batches:
joint image and video training at a chosen mix). With packing (data/packing.py) every sample
has a target shape of its own instead of a bucket, the epoch's samples are packed into
sequences, and a batch is `packing.packs_per_rank` consecutive packs. From the current position
the plan is read in
rows of `world` batches, rank r taking the r-th of each row (batch j goes to rank j % world in
a fresh epoch), and `consumed_samples` counts the samples of every plan batch before the
position, so a run resumes exactly where it stopped, on any number of ranks. An epoch ends when
fewer than `world` batches are left.

Scale. At 100 million samples nothing here may hold Python objects per sample, nor whole
columns in memory. The manifests are streamed a batch of rows at a time: buckets are assigned
with numpy once per distinct (width, height, frames), and the per-sample columns the reader
needs (raw arrays, and the keys in an Arrow file) and the sample ids grouped by bucket are
written as files beside the manifest, under a key of the manifests, the bucket table and the
frame rate. Epoch plans are arrays cached the same way. Every process (ranks, their loader
workers, the budget walk) memory-maps the same files, so the operating system keeps one copy per
node, and a warm start reads no manifest at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.buckets import Bucket, BucketTable
from data.manifest import ManifestSource, manifest_batches, resolve_sources
from data.packing import PackingTable, pack_count, pack_epoch
from data.storage import identity, is_remote, local_path, parent

PLAN_FORMAT = 4  # bump when the cached files change meaning
# The per-sample columns the reader needs, as raw little-endian arrays; `shard` and `media`
# index the plan's lists of shard URLs and media extensions.
COLUMN_TYPES = {
    "shard": "<i4",
    "offset": "<i8",
    "size": "<i8",
    "media": "i1",
    "width": "<i4",
    "height": "<i4",
    "frames": "<i4",
    "fps": "<f8",
    "bucket": "<i2",  # an index into the plan's buckets (with packing: its target shapes)
}
ID_TYPE = np.dtype("<i4")  # sample ids: a plan holds fewer than 2**31 samples
log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PlannedBatch:
    bucket: Bucket | None  # None: a batch of packs, whose samples each have a shape of their own
    sample_ids: tuple[int, ...]
    shapes: tuple[Bucket, ...] = ()  # packed: each sample's target shape
    pack_sizes: tuple[int, ...] = ()  # packed: samples per pack, in order

    def shape_of(self, position: int) -> Bucket:
        """The shape the `position`-th sample is cut to."""
        return self.bucket if self.bucket is not None else self.shapes[position]


def frames_at_fps(frames: np.ndarray, fps: np.ndarray, target_fps: float) -> np.ndarray:
    """How many frames each sample offers at the target frame rate."""
    stride = np.maximum(1.0, fps / target_fps)
    return np.where(frames <= 1, 1, ((frames - 1) // stride).astype(np.int64) + 1)


def assign_buckets(
    width: np.ndarray,
    height: np.ndarray,
    frames: np.ndarray,
    table: BucketTable | PackingTable,
    known: dict[int, int] | None = None,
    shapes: dict[tuple[int, int, int], int] | None = None,
) -> np.ndarray:
    """Each sample's bucket index in `table.buckets` (-1: none fits), or with a packing table its
    target shape's index in `shapes` (grown as shapes appear). The table's own rule runs once
    per distinct (width, height, frames), where frames beyond the longest a sample may keep are
    all alike; `known` carries those answers from one call to the next."""
    known = {} if known is None else known
    if isinstance(table, PackingTable):
        shapes = {} if shapes is None else shapes
        longest = table.max_frames

        def rule(width: int, height: int, frames: int) -> int:
            target = table.target(width, height, frames)
            return -1 if target is None else shapes.setdefault(target, len(shapes))
    else:
        longest = max(b.frames for b in table.buckets)
        index = {bucket: i for i, bucket in enumerate(table.buckets)}

        def rule(width: int, height: int, frames: int) -> int:
            bucket = table.assign(width, height, frames)
            return -1 if bucket is None else index[bucket]

    capped = np.minimum(frames, longest).astype(np.int64)
    valid = (width > 0) & (height > 0) & (width < 2**21) & (height < 2**21)
    packed = (width.astype(np.int64) << 42) | (height.astype(np.int64) << 21) | capped
    encoded = pc.dictionary_encode(pa.array(np.where(valid, packed, -1)))

    def bucket_of(value: int) -> int:
        if value < 0:
            return -1
        return rule(value >> 42, (value >> 21) & (2**21 - 1), value & (2**21 - 1))

    choice = np.array(
        [
            known[value] if value in known else known.setdefault(value, bucket_of(value))
            for value in encoded.dictionary.to_pylist()
        ],
        dtype=np.int16,
    )
    return choice[encoded.indices.to_numpy(zero_copy_only=False)]


@dataclass
class EpochPlan:
    """One epoch's batches as arrays: batch i is `order[start[i] : start[i] + size]` of bucket
    `bucket[i]` (-1 for packs), and `cumulative[i]` samples come before it (`cumulative` has one
    more entry). Packed, pack p is `order[pack_start[p] : pack_start[p + 1]]`."""

    order: np.ndarray
    bucket: np.ndarray
    start: np.ndarray
    cumulative: np.ndarray
    pack_start: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.bucket)

    def sample_ids(self, index: int) -> np.ndarray:
        start = int(self.start[index])
        return self.order[start : start + int(self.cumulative[index + 1] - self.cumulative[index])]

    def first_batch(self, consumed: int, where: str) -> int:
        """The plan index after `consumed` samples."""
        first = int(np.searchsorted(self.cumulative, consumed))
        if first >= len(self.cumulative) or self.cumulative[first] != consumed:
            raise ValueError(
                f"data state consumed_samples={consumed} is not a batch boundary of {where}"
            )
        return first


class DataPlan:
    """The samples of `data.shards` (columns, memory-mapped), their buckets (or, packed, their
    target shapes), and every epoch's seeded plan; see the module docstring. Build it with
    `DataPlan.open`."""

    def __init__(self, folder: Path, table: BucketTable | PackingTable, image_share: float | None):
        self.folder, self.table, self.image_share = folder, table, image_share
        self.packing = table if isinstance(table, PackingTable) else None
        if self.packing is not None and image_share is not None:
            raise ValueError(
                f"data.image_share={image_share} mixes batches of buckets; with packing, images "
                "and videos share packs in the data's own mix: leave it null"
            )
        meta = json.loads((folder / "plan.json").read_text())
        self.shards: list[str] = meta["shards"]
        self.medias: list[str] = meta["medias"]
        self.unassigned: int = meta["unassigned"]
        self.num_samples: int = meta["samples"]
        self.keys = pa.ipc.open_file(pa.memory_map(str(folder / "keys.arrow"))).read_all()["key"]
        self.columns = {
            name: np.memmap(folder / f"{name}.bin", np.dtype(dtype), "r", shape=(self.num_samples,))
            for name, dtype in COLUMN_TYPES.items()
        }
        self.bucket_counts = np.asarray(meta["bucket_counts"], dtype=np.int64)
        self.bucket_ends = np.cumsum(self.bucket_counts)
        self.by_bucket_ids = np.memmap(
            folder / "by_bucket.bin", ID_TYPE, "r", shape=(int(self.bucket_counts.sum()),)
        )
        if self.packing is None:
            self.buckets: list[Bucket] = table.buckets
            self.batch_sizes = np.array([b.batch_size for b in table.buckets], dtype=np.int64)
            self.batches_per_epoch = int(sum(self.bucket_counts // self.batch_sizes))
        else:
            self.buckets = [self.packing.bucket(*shape) for shape in meta["shapes"]]
            tokens, counts = self._token_counts()
            packs = pack_count(tokens, counts, self.packing.cfg.sequence_tokens)
            self.batches_per_epoch = packs // self.packing.cfg.packs_per_rank
        self._epoch: tuple[str, EpochPlan] | None = None

    # Loader workers started by `spawn` re-open the files rather than copying arrays.
    def __reduce__(self):
        return DataPlan, (self.folder, self.table, self.image_share)

    @classmethod
    def open(
        cls,
        shards: str,
        table: BucketTable | PackingTable,
        fps: float,
        image_share: float | None = None,
        cache_dir: str | Path = ".cache/data",
    ) -> DataPlan:
        """The plan of `shards` (a `data.shards` spec), from its cache when one matches."""
        sources = resolve_sources(shards)
        key = _cache_key(sources, table, fps)
        folder = _cache_root(sources, Path(cache_dir)) / f"plan-{key}"
        if not (folder / "plan.json").exists():
            with _locked(folder.with_suffix(".lock")):
                if not (folder / "plan.json").exists():
                    _build(folder, sources, table, fps, shards)
        return cls(folder, table, image_share)

    # --- samples ---

    def bucket_ids(self, bucket: int) -> np.ndarray:
        """The ids of bucket `bucket` (an index into `buckets`) in manifest order."""
        end = int(self.bucket_ends[bucket])
        return self.by_bucket_ids[end - int(self.bucket_counts[bucket]) : end]

    def _token_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct token counts of the shapes (most first) and the samples of each."""
        tokens = np.array([b.tokens_per_sample for b in self.buckets], dtype=np.int64)
        distinct = np.unique(tokens)[::-1]
        counts = np.array([self.bucket_counts[tokens == t].sum() for t in distinct])
        return distinct, counts.astype(np.int64)

    def key(self, sample_id: int) -> str:
        return self.keys[sample_id].as_py()

    def shard(self, sample_id: int) -> str:
        return self.shards[int(self.columns["shard"][sample_id])]

    def media(self, sample_id: int) -> str:
        return self.medias[int(self.columns["media"][sample_id])]

    # --- epochs ---

    @property
    def _epoch_kind(self) -> str:
        """What besides seed and epoch decides an epoch's batches (part of its folder's name)."""
        if self.packing is not None:
            return f"p{self.packing.cfg.packs_per_rank}"
        return f"i{self.image_share}"

    def epoch(self, seed: int, epoch: int) -> EpochPlan:
        """Epoch `epoch`'s plan; the latest one asked for is kept."""
        name = f"epoch-s{seed}-e{epoch}-{self._epoch_kind}"
        if self._epoch is None or self._epoch[0] != name:
            self._epoch = (name, self._load_epoch(name, seed, epoch))
        return self._epoch[1]

    def batch(self, seed: int, epoch: int, index: int) -> PlannedBatch:
        plan = self.epoch(seed, epoch)
        ids = plan.sample_ids(index)
        if plan.pack_start is None:
            return PlannedBatch(self.buckets[int(plan.bucket[index])], tuple(ids.tolist()))
        packs = self.packing.cfg.packs_per_rank
        ends = plan.pack_start[index * packs : (index + 1) * packs + 1]
        return PlannedBatch(
            None,
            tuple(ids.tolist()),
            tuple(self.buckets[b] for b in self.columns["bucket"][ids].tolist()),
            tuple(np.diff(ends).tolist()),
        )

    def sample_buckets(self, seed: int, epoch: int, index: int) -> np.ndarray:
        """The bucket (or target shape) index of every sample of a plan batch."""
        plan = self.epoch(seed, epoch)
        if plan.pack_start is None:
            size = int(plan.cumulative[index + 1] - plan.cumulative[index])
            return np.full(size, int(plan.bucket[index]))
        return self.columns["bucket"][plan.sample_ids(index)]

    def first_batch(self, state: DataState) -> int:
        """The plan index of `state`; a state that is no batch boundary fails."""
        plan = self.epoch(state.seed, state.epoch)
        return plan.first_batch(
            state.consumed_samples, f"epoch {state.epoch}'s plan (seed {state.seed})"
        )

    def rows(
        self, state: DataState, dp_rank: int, dp_world: int
    ) -> Iterator[tuple[int, int, DataState]]:
        """(epoch, plan index of this rank's batch, state after the row) for every row from
        `state` on."""
        epoch, consumed = state.epoch, state.consumed_samples
        while True:
            plan = self.epoch(state.seed, epoch)
            if len(plan) < dp_world:
                raise ValueError(
                    f"epoch {epoch}'s plan has {len(plan)} batches (data.image_share="
                    f"{self.image_share}), fewer than the {dp_world} data-parallel ranks"
                )
            first = self.first_batch(DataState(state.seed, epoch, consumed))
            num_rows = (len(plan) - first) // dp_world
            for row in range(num_rows):
                end = first + (row + 1) * dp_world
                after = (
                    DataState(state.seed, epoch + 1, 0)
                    if row == num_rows - 1
                    else DataState(state.seed, epoch, int(plan.cumulative[end]))
                )
                yield epoch, end - dp_world + dp_rank, after
            epoch, consumed = epoch + 1, 0

    def _load_epoch(self, name: str, seed: int, epoch: int) -> EpochPlan:
        folder = self.folder / name
        with _locked(self.folder / "epochs.lock"):  # so no process removes it mid-load
            if not folder.exists():
                arrays = (
                    self._shuffle(seed, epoch) if self.packing is None else self._pack(seed, epoch)
                )
                with _staged(folder) as tmp:
                    for name, array in arrays.items():
                        np.save(tmp / f"{name}.npy", array)
                self._forget_old_epochs(seed, epoch)
            arrays = {
                field.name: np.load(folder / f"{field.name}.npy", mmap_mode="r")
                for field in fields(EpochPlan)
                if (folder / f"{field.name}.npy").exists()
            }
        return EpochPlan(**arrays)

    def _forget_old_epochs(self, seed: int, epoch: int) -> None:
        """Keep the newest two epochs of each (seed, image share); a process still reading an
        older one keeps its mapping."""
        for old in self.folder.glob(f"epoch-s{seed}-e*-{self._epoch_kind}"):
            if int(old.name.split("-e")[1].split("-")[0]) < epoch - 1:
                shutil.rmtree(old, ignore_errors=True)

    def _shuffle(self, seed: int, epoch: int) -> dict[str, np.ndarray]:
        """Each bucket shuffled and cut (dropping a last, partial batch), then, with
        `image_share`, image or video batches left out to make images that share of them, then
        the batches shuffled; all seeded by (seed, epoch)."""
        rng = np.random.default_rng([seed, epoch])
        parts, buckets, starts, position = [], [], [], 0
        for index, size in enumerate(self.batch_sizes.tolist()):  # a fixed order
            ids = rng.permutation(np.array(self.bucket_ids(index)))  # a copy: mmaps are read-only
            count = len(ids) // size
            parts.append(ids[: count * size])
            buckets.append(np.full(count, index, dtype=np.int16))
            starts.append(position + size * np.arange(count, dtype=np.int64))
            position += count * size
        bucket, start = np.concatenate(buckets), np.concatenate(starts)
        if self.image_share is not None:
            kept = self._mix_images(bucket, rng)
            bucket, start = bucket[kept], start[kept]
        order = rng.permutation(len(bucket))
        bucket, start = bucket[order], start[order]
        cumulative = np.concatenate([[0], np.cumsum(self.batch_sizes[bucket], dtype=np.int64)])
        return {
            "order": np.concatenate(parts),
            "bucket": bucket,
            "start": start,
            "cumulative": cumulative,
        }

    def _pack(self, seed: int, epoch: int) -> dict[str, np.ndarray]:
        """The samples of each token count shuffled, packed (data/packing.py), and the packs cut
        into batches of `packs_per_rank` (dropping a last, partial batch); seeded by (seed,
        epoch)."""
        rng = np.random.default_rng([seed, epoch])
        tokens = np.array([b.tokens_per_sample for b in self.buckets], dtype=np.int64)
        distinct, _ = self._token_counts()
        ids = [
            rng.permutation(
                np.concatenate([self.bucket_ids(i) for i in np.flatnonzero(tokens == t)])
            )
            for t in distinct.tolist()
        ]
        order, pack_start = pack_epoch(distinct, ids, self.packing.cfg.sequence_tokens, rng)
        per_batch = self.packing.cfg.packs_per_rank
        batches = (len(pack_start) - 1) // per_batch
        pack_start = pack_start[: batches * per_batch + 1]
        cumulative = pack_start[::per_batch]
        return {
            "order": order[: pack_start[-1]],
            "bucket": np.full(batches, -1, dtype=np.int16),
            "start": cumulative[:-1],
            "cumulative": cumulative,
            "pack_start": pack_start,
        }

    def _mix_images(self, bucket: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices of a seeded subset of batches in which images are `image_share` of all: the
        scarcer kind is kept whole."""
        share = self.image_share
        is_image = np.array([b.frames == 1 for b in self.table.buckets])[bucket]
        images, videos = np.flatnonzero(is_image), np.flatnonzero(~is_image)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"data.image_share={share}: must be in [0, 1]")
        if (share > 0 and not len(images)) or (share < 1 and not len(videos)):
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

        def chosen(kind: np.ndarray, count: int) -> np.ndarray:
            return kind[np.sort(rng.permutation(len(kind))[:count])]

        return np.concatenate([chosen(images, keep_images), chosen(videos, keep_videos)])


# --- the cache ---------------------------------------------------------------------------


def _cache_key(sources: list[ManifestSource], table: BucketTable | PackingTable, fps: float) -> str:
    facts = {
        "format": PLAN_FORMAT,
        "manifests": [[identity(s.url), s.shards] for s in sources],
        "fps": fps,
        **table.cache_facts(),
    }
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def _cache_root(sources: list[ManifestSource], cache_dir: Path) -> Path:
    """Beside the first manifest when it is local and its folder writable, else `cache_dir`."""
    first = sources[0].url
    if not is_remote(first):
        folder = Path(parent(local_path(first)))
        if os.access(folder, os.W_OK):
            return folder / ".tessera-plans"
    return cache_dir / "plans"


@contextmanager
def _locked(path: Path):
    """One process of a node at a time (the others find the result when they get the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _staged(folder: Path):
    """A temporary folder beside `folder`, renamed into place when the block succeeds: readers
    see `folder` whole or not at all, and a failed build leaves nothing behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        try:
            tmp.rename(folder)
        except OSError:  # another node wrote it first (same inputs, same files)
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(
    folder: Path,
    sources: list[ManifestSource],
    table: BucketTable | PackingTable,
    fps: float,
    spec: str,
) -> None:
    """Stream the manifests a batch of rows at a time (memory stays flat in the dataset's size):
    assign buckets (or target shapes), append each column to its file, and group sample ids by
    bucket."""
    with _staged(folder) as tmp:
        shards, medias, count, by_bucket, shapes = _write_columns(tmp, sources, table, fps, spec)
        counts = [sum(len(ids) for ids in parts) for parts in by_bucket]
        with open(tmp / "by_bucket.bin", "wb") as file:
            for parts in by_bucket:
                for ids in parts:
                    file.write(ids.tobytes())
        meta = {
            "samples": count,
            "unassigned": count - sum(counts),
            "bucket_counts": counts,
            "shards": shards,
            "medias": medias,
            "shapes": shapes,
        }
        (tmp / "plan.json").write_text(json.dumps(meta))
    log.info("data plan of %d samples cached at %s", count, folder)


def _write_columns(
    tmp: Path,
    sources: list[ManifestSource],
    table: BucketTable | PackingTable,
    fps: float,
    spec: str,
) -> tuple[list[str], list[str], int, list[list[np.ndarray]], list[list[int]]]:
    """The per-sample column files and keys of every manifest row: (shard URLs, media kinds,
    sample count, each bucket's sample ids in pieces, the buckets' or target shapes' [frames,
    height, width])."""
    shards: dict[str, int] = {}
    medias: dict[str, int] = {}
    known: dict[int, int] = {}
    shapes: dict[tuple[int, int, int], int] = (
        {} if isinstance(table, PackingTable) else {b.shape: i for i, b in enumerate(table.buckets)}
    )
    by_bucket: list[list[np.ndarray]] = []
    count = 0
    with ExitStack() as stack:
        files = {
            name: stack.enter_context(open(tmp / f"{name}.bin", "wb")) for name in COLUMN_TYPES
        }
        keys = stack.enter_context(
            pa.ipc.new_file(str(tmp / "keys.arrow"), pa.schema([("key", pa.large_string())]))
        )
        for source in sources:
            for batch in manifest_batches(source):
                column = {name: batch.column(name) for name in batch.schema.names}
                numbers = {
                    name: column[name].to_numpy()
                    for name in ("offset", "size", "width", "height", "frames", "fps")
                }
                numbers["shard"] = _indices(column["shard"], shards, COLUMN_TYPES["shard"])
                numbers["media"] = _indices(column["media"], medias, COLUMN_TYPES["media"])
                available = frames_at_fps(numbers["frames"], numbers["fps"], fps)
                numbers["bucket"] = assign_buckets(
                    numbers["width"], numbers["height"], available, table, known, shapes
                )
                if len(shapes) > np.iinfo(COLUMN_TYPES["bucket"]).max:
                    raise ValueError(
                        f"data.shards={spec!r}: over {len(shapes) - 1} distinct target shapes; "
                        "lower packing.max_frames or packing.max_tokens_per_sample"
                    )
                by_bucket += [[] for _ in range(len(shapes) - len(by_bucket))]
                for name, file in files.items():
                    file.write(numbers[name].astype(COLUMN_TYPES[name]).tobytes())
                keys.write_batch(
                    pa.record_batch([column["key"].cast(pa.large_string())], names=["key"])
                )
                _group_by_bucket(numbers["bucket"], count, by_bucket)
                count += batch.num_rows
                if count >= 2**31:
                    raise ValueError(f"data.shards={spec!r}: over 2**31 samples in one plan")
    if count == 0:
        raise FileNotFoundError(f"data.shards={spec!r}: the shards hold no samples")
    return list(shards), list(medias), count, by_bucket, [list(shape) for shape in shapes]


def _indices(values: pa.DictionaryArray, index: dict[str, int], dtype: str) -> np.ndarray:
    """Dictionary indices of one batch turned into indices of the plan-wide list `index`."""
    if not pa.types.is_dictionary(values.type):
        values = values.dictionary_encode()
    lookup = np.array(
        [index.setdefault(name, len(index)) for name in values.dictionary.to_pylist()], dtype=dtype
    )
    return lookup[values.indices.to_numpy(zero_copy_only=False)]


def _group_by_bucket(bucket: np.ndarray, first_id: int, by_bucket: list[list[np.ndarray]]) -> None:
    """Append each bucket's sample ids of a batch (ids from `first_id`) in manifest order."""
    order = np.argsort(bucket, kind="stable").astype(ID_TYPE) + ID_TYPE.type(first_id)
    ends = np.cumsum(np.bincount(bucket + 1, minlength=len(by_bucket) + 1))
    for index, parts in enumerate(by_bucket):
        parts.append(order[ends[index] : ends[index + 1]])

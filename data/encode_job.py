"""The latent-shard encoding job: latent shards from pixel shards, so that training runs neither
frozen encoder (the format is data/latents.py's; the loader reads both kinds). The command that
runs it with a training config's encoders is `python -m train.encode`; this job knows them only
as the two calls of `Encoders`.

What is encoded: every sample of `data.shards` that the plan puts in a bucket (the config's
buckets and data.fps), at that bucket's size, or with packing at its own target shape
(data/packing.py), cut as `data.augment=false` cuts it: the middle frames at data.fps and the
centre crop. A run on the latent shards sees the same clips a run with data.augment=false
would encode.

The samples are ordered bucket by bucket (each bucket's in manifest order), so that the plan
over the latent shards makes the same batches as over the pixel shards, and cut into shards of
`samples_per_shard`. Rank r of `world` encodes shards r, r + world, ..., each in batches of
consecutive samples of one bucket: the bytes depend neither on the number of ranks nor on which
rank wrote them.

Resume: a shard is committed by its part `.encode/parts/shard-NNNNNN.parquet` (its manifest
rows), written after its tar; a rerun skips committed shards and rewrites the others with the
same bytes. `.encode/job.json` records what decides the output, and a rerun with other options
refuses. Once every rank is done, rank 0 merges the parts into `manifest.parquet`, writes
`report.json` (samples, bytes, and every skipped sample with its reason) and the empty caption,
and last `encoding.json`: a folder without it is no finished encoding.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from data.buckets import Bucket
from data.decode import DecodeError
from data.latents import (
    DTYPES,
    LATENT_MEDIA,
    NULL_CAPTION_NAME,
    RECORD_NAME,
    null_caption_bytes,
    sample_bytes,
)
from data.manifest import SCHEMA
from data.pipeline import DataConfig, decode_planned
from data.plan import DataPlan
from data.reader import SampleError, SampleReader
from data.shard_writer import add_member, merge_manifests, write_rows
from data.storage import ReadError, atomic_path, write_atomic

WORK_DIR = ".encode"
REPORT_NAME = "report.json"
log = logging.getLogger(__name__)


class Encoders(Protocol):
    def video(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, T, H, W, 3) -> the posterior's normalised mean and log-variance."""

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> embeddings (B, L, D) and masks (B, L)."""


@dataclass(frozen=True)
class EncodeOptions:
    out: Path
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    logvar: bool = False  # store the posterior's log-variance beside its mean
    batch_size: int = 8  # samples of one bucket encoded together
    samples_per_shard: int = 512


@dataclass
class Loaded:
    """One sample ready to encode, or the reason it is skipped."""

    sample_id: int
    key: str
    clip: np.ndarray | None = None
    meta: dict | None = None
    error: str | None = None


class EncodeJob:
    """The latent shards of one plan: which samples go in which shard, and the files."""

    def __init__(self, plan: DataPlan, data: DataConfig, options: EncodeOptions, record: dict):
        self.plan, self.data, self.options, self.record = plan, data, options, record
        self.order = np.asarray(plan.by_bucket_ids)  # bucket by bucket, manifest order in each
        self.num_shards = -(-len(self.order) // options.samples_per_shard)
        self.reader = SampleReader(plan, data.read_retries, data.read_backoff_s, data.cache_dir)
        self.work = options.out / WORK_DIR

    def part(self, shard: int) -> Path:
        return self.work / "parts" / f"shard-{shard:06d}.parquet"

    def check_job(self) -> dict:
        """What decides the output; a rerun into the same folder must match it."""
        job = {
            "samples": len(self.order),
            "samples_per_shard": self.options.samples_per_shard,
            "batch_size": self.options.batch_size,
            "record": self.record,
        }
        path = self.work / "job.json"
        if path.exists():
            before = json.loads(path.read_text())
            differ = [key for key in job if key != "record" and before.get(key) != job[key]]
            differ += [
                f"record.{key}"
                for key in self.record
                if before.get("record", {}).get(key) != self.record[key]
            ]
            if differ:
                raise ValueError(
                    f"{self.options.out} holds an encoding made with other {', '.join(differ)} "
                    f"({path}): encode into a new folder, or remove it"
                )
        return job

    def start(self, job: dict) -> None:
        """On one rank, before any encodes."""
        (self.work / "parts").mkdir(parents=True, exist_ok=True)
        for stale in self.options.out.glob("*.tmp"):  # what a killed run was writing
            stale.unlink()
        path = self.work / "job.json"
        if not path.exists():
            write_atomic(path, json.dumps(job, indent=1).encode())

    def encode(self, encoders: Encoders, rank: int, world: int) -> None:
        """This rank's shards that are not committed yet."""
        todo = [j for j in range(rank, self.num_shards, world) if not self.part(j).exists()]
        log.info("rank %d: %d of its shards to encode", rank, len(todo))
        with ThreadPoolExecutor(max(2, self.data.num_workers)) as pool:
            for shard in todo:
                self.encode_shard(shard, encoders, pool)
                log.info("rank %d: shard %d of %d committed", rank, shard + 1, self.num_shards)

    def encode_shard(self, shard: int, encoders: Encoders, pool: ThreadPoolExecutor) -> None:
        size = self.options.samples_per_shard
        ids = self.order[shard * size : (shard + 1) * size].tolist()
        name = f"shard-{shard:06d}.tar"
        rows, skipped = [], []
        loads = _windowed(pool, self._load, ids, 2 * self.options.batch_size)
        with atomic_path(self.options.out / name) as tmp, tarfile.open(tmp, mode="w") as tar:
            for group in self._groups(loads):
                skipped += [{"key": s.key, "reason": s.error} for s in group if s.error]
                loaded = [s for s in group if s.error is None]
                if loaded:
                    rows += self._write_group(tar, name, loaded, encoders)
        report = {"samples": len(rows), "skipped": skipped}
        write_atomic(self.part(shard).with_suffix(".json"), json.dumps(report).encode())
        write_rows(pa.Table.from_pylist(rows, schema=SCHEMA), self.part(shard))  # the commit

    def _groups(self, loaded: Iterator[Loaded]) -> Iterator[list[Loaded]]:
        """Consecutive samples of one bucket, up to --batch-size: what is encoded together."""
        group: list[Loaded] = []
        for sample in loaded:
            if group and (
                len(group) == self.options.batch_size
                or self._bucket(sample.sample_id) != self._bucket(group[0].sample_id)
            ):
                yield group
                group = []
            group.append(sample)
        if group:
            yield group

    def _bucket(self, sample_id: int) -> Bucket:
        return self.plan.buckets[int(self.plan.columns["bucket"][sample_id])]

    def _load(self, sample_id: int) -> Loaded:
        """Read and decode one sample as data.augment=false does: middle frames, centre crop."""
        key = self.plan.key(sample_id)
        try:
            raw = self.reader.read(sample_id)
            clip = decode_planned(
                self.plan, sample_id, raw, self._bucket(sample_id), self.data.fps, None
            )
        except (DecodeError, SampleError, ReadError) as error:
            log.warning("skipping sample %s of %s: %s", key, self.plan.shard(sample_id), error)
            return Loaded(sample_id, key, error=str(error))
        return Loaded(sample_id, key, clip, raw.meta)

    def _write_group(
        self, tar: tarfile.TarFile, shard: str, group: list[Loaded], encoders: Encoders
    ) -> list[dict]:
        """Encode a group and append its samples to the tar; their manifest rows."""
        mean, logvar = encoders.video(torch.from_numpy(np.stack([s.clip for s in group])))
        texts = {"caption": encoders.text([s.meta["caption"] for s in group])}
        recaptioned = [i for i, s in enumerate(group) if s.meta.get("recaption")]
        if recaptioned:
            embedded = encoders.text([group[i].meta["recaption"] for i in recaptioned])
            texts["recaption"] = dict(zip(recaptioned, zip(*embedded, strict=True), strict=True))
        dtype = DTYPES[self.options.dtype]
        rows = []
        for i, sample in enumerate(group):
            text = {"caption": (texts["caption"][0][i], texts["caption"][1][i])}
            if i in texts.get("recaption", {}):
                text["recaption"] = texts["recaption"][i]
            stored_logvar = logvar[i] if self.options.logvar else None
            meta, row = self._metadata(sample, shard)
            start = tar.offset
            add_member(tar, f"{sample.key}.json", json.dumps(meta).encode())
            add_member(
                tar,
                f"{sample.key}.{LATENT_MEDIA}",
                sample_bytes(mean[i], stored_logvar, text, dtype),
            )
            rows.append(row | {"offset": start, "size": tar.offset - start})
        return rows

    def _metadata(self, sample: Loaded, shard: str) -> tuple[dict, dict]:
        """The sample's json member (its source's, with the bucket it was cut for) and its
        manifest row (the source's size, frame rate and duration, so the plan buckets it the
        same), less the byte span."""
        columns, i = self.plan.columns, sample.sample_id
        source = {
            "width": int(columns["width"][i]),
            "height": int(columns["height"][i]),
            "frames": int(columns["frames"][i]),
            "fps": float(columns["fps"][i]),
        }
        duration = sample.meta.get("duration", source["frames"] / max(source["fps"], 1e-9))
        meta = sample.meta | source | {"bucket": list(self._bucket(i).shape)}
        row = {
            "key": sample.key,
            "shard": shard,
            "media": LATENT_MEDIA,
            **source,
            "duration": float(duration),
            "has_recaption": bool(sample.meta.get("recaption")),
        }
        return meta, row

    def finish(self, null_caption: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """Manifest, report, empty caption and, last, the record (rank 0, all shards done)."""
        out, parts = self.options.out, [self.part(j) for j in range(self.num_shards)]
        absent = [str(p) for p in parts if not p.exists()]
        if absent:
            raise FileNotFoundError(f"shards not encoded yet: {absent[:5]}")
        merge_manifests(parts, out)
        reports = [json.loads(p.with_suffix(".json").read_text()) for p in parts]
        report = {
            "samples": sum(r["samples"] for r in reports),
            "shards": self.num_shards,
            "bytes": sum(
                (out / f"shard-{j:06d}.tar").stat().st_size for j in range(self.num_shards)
            ),
            "skipped": [row for r in reports for row in r["skipped"]],
        }
        write_atomic(out / REPORT_NAME, json.dumps(report, indent=1).encode())
        embedding, mask = null_caption
        write_atomic(
            out / NULL_CAPTION_NAME, null_caption_bytes(embedding, mask, DTYPES[self.options.dtype])
        )
        write_atomic(out / RECORD_NAME, json.dumps(self.record, indent=1).encode())
        return report


def _windowed(
    pool: ThreadPoolExecutor, fn: Callable[[int], Loaded], items: list[int], window: int
) -> Iterator[Loaded]:
    """fn over items in order, at most `window` in flight (a decoded clip can be hundreds of MB)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()

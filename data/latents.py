"""Latent shards: the frozen encoders' outputs per sample, written by `python -m train.encode` (the
job is data/encode_job.py) and read by the loader in place of pixels, so that training runs
neither encoder. This module owns the format: the files, a sample's member, a batch of them, and
how to tell a latent shard folder (one with a record) from a pixel one.

A latent shard folder is a shard folder like any other: tars and a `manifest.parquet` with the
pixel manifest's columns. Each row keeps its source's size, frame rate and duration, so the
plan puts every sample in the bucket it was encoded for, and only `media` differs. Beside them:

- `encoding.json`, the record of what made the latents: the autoencoder and the text encoder
  (their config and a digest of their weight files), the dtype, whether the log-variance is
  stored, the buckets and frame rate the clips were cut for, and how (the middle frames and the
  centre crop, as `data.augment=false` decodes them);
- `null_caption.safetensors`: the empty caption's embedding and mask, for caption dropout.

A sample is two tar members: `<key>.json`, its source's metadata (captions included, plus the
`bucket` it was cut for), and `<key>.latents.safetensors`, holding

- `mean` (C, T, H, W), and `logvar` where stored: the autoencoder's normalised posterior;
- `caption` (n, D), the caption's embedding at its n real tokens, and `caption_mask` (L,);
- `recaption` and `recaption_mask` for a sample with a recaption.

The text encoder zeroes padding positions, so keeping only the real tokens' rows loses nothing
and saves most of the bytes (a T5-XXL caption padded to 226 tokens is 1.8 MB in bf16).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from data.decode import DecodeError
from data.storage import exists, join, parent, read_bytes, redact, write_atomic

LATENT_MEDIA = "latents.safetensors"  # the media member of a latent shard's sample
RECORD_NAME = "encoding.json"
NULL_CAPTION_NAME = "null_caption.safetensors"
RECORD_FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_FIELDS = ("caption", "recaption")


@dataclass
class LatentSample:
    mean: torch.Tensor  # (C, T, H, W)
    logvar: torch.Tensor | None
    text: dict[str, tuple[torch.Tensor, torch.Tensor]]  # field -> (embedding (L, D), mask (L,))


@dataclass
class LatentBatch:
    """A batch's stored tensors, in their stored dtype: the posterior's mean (B, C, T', H', W')
    and, where every sample stores one, its log-variance; the chosen captions' embeddings
    (B, L, D) and masks (B, L)."""

    mean: torch.Tensor
    logvar: torch.Tensor | None
    text: torch.Tensor
    text_mask: torch.Tensor

    @classmethod
    def stack(cls, samples: list[tuple[LatentSample, str]]) -> LatentBatch:
        """The batch of (sample, the caption field chosen for it)."""
        logvars = [sample.logvar for sample, _ in samples]
        texts = [sample.text[field] for sample, field in samples]
        return cls(
            torch.stack([sample.mean for sample, _ in samples]),
            None if any(v is None for v in logvars) else torch.stack(logvars),
            torch.stack([text for text, _ in texts]),
            torch.stack([mask for _, mask in texts]),
        )

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def pin_memory(self) -> LatentBatch:
        logvar = None if self.logvar is None else self.logvar.pin_memory()
        return LatentBatch(
            self.mean.pin_memory(), logvar, self.text.pin_memory(), self.text_mask.pin_memory()
        )


def sample_bytes(
    mean: torch.Tensor,
    logvar: torch.Tensor | None,
    text: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
) -> bytes:
    """A sample's `latents.safetensors` member; tensors are cast to `dtype` (masks stay bool)."""
    tensors = {"mean": mean.to(dtype)}
    if logvar is not None:
        tensors["logvar"] = logvar.to(dtype)
    for field, (embedding, mask) in text.items():
        tensors[field] = embedding[mask].to(dtype)
        tensors[f"{field}_mask"] = mask.bool()
    return safetensors.torch.save({name: t.contiguous().cpu() for name, t in tensors.items()})


def read_sample(data: bytes, key: str) -> LatentSample:
    """A `latents.safetensors` member back as tensors; DecodeError naming `key` when it is cut
    short or lacks a tensor."""
    try:
        tensors = safetensors.torch.load(data)
        text = {
            field: (unpack_text(tensors[field], tensors[f"{field}_mask"]), tensors[f"{field}_mask"])
            for field in TEXT_FIELDS
            if field in tensors
        }
        if "caption" not in text:
            raise KeyError("caption")
        return LatentSample(tensors["mean"], tensors.get("logvar"), text)
    except (safetensors.SafetensorError, KeyError, RuntimeError, ValueError) as error:
        raise DecodeError(f"sample {key}: unreadable {LATENT_MEDIA}: {error!r}") from error


def unpack_text(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(L, D) embedding from the real tokens' rows (n, D) and the mask (L,): zero elsewhere."""
    if int(mask.sum()) != len(rows):
        raise ValueError(f"{len(rows)} embedding rows for a mask of {int(mask.sum())} tokens")
    embedding = rows.new_zeros(len(mask), rows.shape[-1])
    embedding[mask] = rows
    return embedding


def null_caption_bytes(embedding: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> bytes:
    return safetensors.torch.save(
        {"embedding": embedding.to(dtype).contiguous().cpu(), "mask": mask.bool().cpu()}
    )


def read_null_caption(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty caption's (1, L, D) embedding and (1, L) mask of a latent shard folder."""
    tensors = safetensors.torch.load(read_bytes(join(folder, NULL_CAPTION_NAME)))
    return tensors["embedding"], tensors["mask"]


def latent_folder(manifests: list[str]) -> tuple[str, dict] | None:
    """(folder, encoding record) when the manifests (URLs) are latent shards' (their folders hold
    a record), None for pixel shards. Every manifest must be of one kind, and latent ones made
    by the same encoders the same way."""
    records = {}
    for manifest in manifests:
        url = join(parent(manifest), RECORD_NAME)
        records[parent(manifest)] = json.loads(read_bytes(url)) if exists(url) else None
    kinds = {record is None for record in records.values()}
    if len(kinds) > 1:
        raise ValueError(
            f"data.shards mixes latent shards (with {RECORD_NAME}) and pixel shards: "
            + ", ".join(
                f"{redact(f)}: {'pixels' if r is None else 'latents'}" for f, r in records.items()
            )
        )
    folder, record = next(iter(records.items()))
    if record is None:
        return None
    for other, other_record in records.items():
        if _encoding(other_record) != _encoding(record):
            raise ValueError(
                f"latent shards {redact(folder)} and {redact(other)} were encoded differently "
                f"(their {RECORD_NAME} differ): train on one encoding at a time"
            )
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(
            f"{redact(join(folder, RECORD_NAME))} has format {record.get('format')}, this "
            f"version reads {RECORD_FORMAT}: encode the shards again"
        )
    return folder, record


def _encoding(record: dict) -> dict:
    """How a record's latents were made, wherever the encoders' files were."""
    parts = {part: record.get(part) for part in ("latents", "text", "clips")}
    encoders = record.get("encoders") or {}
    return parts | {name: value.get("identity") for name, value in encoders.items()}


# --- what made the latents -------------------------------------------------------------------


def files_digest(paths: list[str], cache_dir: str | Path | None = None) -> str:
    """sha256 over the names (relative to their folder) and bytes of `paths`, sorted: what an
    encoder's weights are, wherever the folder lives. Each file's digest is cached under
    `cache_dir` by path, size and mtime, so a 10 GB encoder is read once per machine."""
    total = hashlib.sha256()
    for path in sorted(paths, key=os.path.basename):
        total.update(os.path.basename(path).encode() + b"\0")
        total.update(_file_digest(path, cache_dir).encode())
    return total.hexdigest()


def _file_digest(path: str, cache_dir: str | Path | None) -> str:
    stat = os.stat(path)
    cached = None
    if cache_dir is not None:
        name = hashlib.sha256(
            f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()
        ).hexdigest()
        cached = Path(cache_dir) / "digests" / name
        if cached.exists():
            return cached.read_text()
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, digest)
    return digest

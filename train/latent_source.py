"""Where a DiT run's latents and caption embeddings come from: the one owner of "pixels or
latents?".

`open_latent_sources` answers it once for `data.shards` and once for `eval.shards`, before any
model is built, and opens a `LatentSource` for each:

- `OnlineLatents` (pixel shards): the frozen encoders run on each batch, from a cache in host
  memory where it has them; `python -m train.encode` writes latent shards through it too.
- `StoredLatents` (latent shards): each batch's stored tensors. Its record must name the run's
  encoders, buckets and frame rate, or the run stops before its first step.

The objective, the evaluator and the sampler see only what both give: the latents' channels and
geometry, the text width, the empty caption, `encode(batch)`, and the frozen encoders for
sampling or encoding pixels (`encoders()`). Those are built on first use and, unless training
encodes pixels every step, freed when that use ends.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch

from data.latents import RECORD_FORMAT, latent_folder, read_null_caption
from data.lru import ByteLRU
from data.manifest import resolve_sources
from data.pipeline import Batch, PackedBatch
from model.geometry import LatentGeometry
from train.config import Config
from train.encoders import FrozenEncoders, describe_encoders, encoder_identity, video_to_float
from train.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """A batch as the DiT takes it: latents (the posterior's mean) and caption embeddings, on
    the device in float32; with train.sample_posterior also the posterior's log-variance. Of a
    packed batch, latents (and logvar) are lists of its shape groups' (B_g, C, T, H, W), and text
    and mask have a row per sample, group after group."""

    latents: torch.Tensor | list[torch.Tensor]
    text: torch.Tensor
    mask: torch.Tensor
    logvar: torch.Tensor | list[torch.Tensor] | None = None


class LatentSource(Protocol):
    latent_channels: int
    text_dim: int
    geometry: LatentGeometry  # the autoencoder's compressions and the DiT's patch
    null_caption: tuple[torch.Tensor, torch.Tensor]  # the empty caption, for caption dropout

    def encode(self, batch: Batch | PackedBatch, device: torch.device) -> Encoded:
        """The batch's latents and caption embeddings."""

    def given_frame_latents(
        self, batch: Batch, given_pixels: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """The latents of the batch's clips with every pixel frame not in `given_pixels` (B, F)
        set to zero: what a model that takes given frames as input channels is shown."""

    def metrics(self) -> dict[str, float]:
        """What the source has to report beside the loss."""

    def encoders(self) -> AbstractContextManager[FrozenEncoders]:
        """The frozen encoders for a block that samples or encodes pixels; what the block builds
        is freed at its end unless training encodes with it every step."""


@dataclass
class LatentSources:
    train: LatentSource  # data.shards
    held_out: LatentSource | None  # eval.shards
    encoders: FrozenEncoders  # what both build on use (`.loaded`: which are in memory)


def open_latent_sources(config: Config, runtime: Runtime) -> LatentSources:
    """The sources of data.shards and eval.shards, sharing one set of frozen encoders: kept in
    memory when training encodes pixels, built only for a moment when it reads latents."""
    stored = stored_latents_record(config.data.shards)
    encoders = FrozenEncoders(config, runtime.device, keep=stored is None)
    cache_bytes = config.train.encoding_cache_mb * 2**20
    cache = EncodingCache(cache_bytes) if cache_bytes else None

    def source(key: str, shards: str, stored: tuple[str, dict] | None) -> LatentSource:
        if stored is None:
            return OnlineLatents(
                encoders, config.model.patch_size, cache, config.train.sample_posterior
            )
        return StoredLatents.open(config, encoders, *stored, f"{key}={shards!r}")

    train = source("data.shards", config.data.shards, stored)
    held_out = None
    if config.eval.shards:
        eval_shards = config.eval.shards
        held_out = source("eval.shards", eval_shards, stored_latents_record(eval_shards))
    return LatentSources(train, held_out, encoders)


def stored_latents_record(shards: str) -> tuple[str, dict] | None:
    """(folder, encoding record) when a shards spec names latent shards, None for pixels."""
    return latent_folder([source.url for source in resolve_sources(shards)])


# --- pixels, encoded online ------------------------------------------------------------------


class EncodingCache:
    """The frozen encoders' outputs, remembered in host memory: a sample's latents by the hash
    of its pixels, a caption's embedding by its text. A batch's misses are encoded together,
    so a cached value can differ in its last bits from the same sample encoded beside others:
    a run with the cache matches one without (or a resumed one) to float rounding, not bit for
    bit. The least recently used entries go first beyond `max_bytes`. Pixels repeat only when
    data.augment is false; with augmentation, latents rarely hit, but captions still do."""

    def __init__(self, max_bytes: int):
        self.store = ByteLRU(max_bytes)

    def lookup(
        self,
        keys: list[Hashable],
        encode: Callable[[list[int]], tuple[torch.Tensor, ...]],
        device: torch.device,
    ) -> tuple[torch.Tensor, ...]:
        """The batch of values of `keys`; `encode(indices)` encodes the missing items together."""
        found = [self.store.get(key) for key in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        if missing:
            encoded = [t.cpu() for t in encode(missing)]
            for row, i in enumerate(missing):
                # Copies, so that an entry does not hold its whole batch's storage.
                found[i] = tuple(t[row : row + 1].clone() for t in encoded)
                self.store.put(keys[i], found[i], sum(t.nbytes for t in found[i]))
        return tuple(torch.cat(parts).to(device) for parts in zip(*found, strict=True))


def pixel_key(video: torch.Tensor) -> tuple:
    """A sample's cache key: its shape and a digest of its uint8 pixels."""
    digest = hashlib.blake2b(video.contiguous().numpy().tobytes(), digest_size=16).digest()
    return ("pixels", tuple(video.shape), digest)


class OnlineLatents:
    """Pixel shards: the frozen encoders encode every batch (`cache`: outputs kept in host
    memory). `posterior`: also the posterior's log-variance (refused with the cache by
    train/config.py). `video` and `text` are the calls of the latent-shard job
    (data/encode_job.py `Encoders`), on the encoders' device and under `autocast`."""

    def __init__(
        self,
        encoders: FrozenEncoders,
        patch,
        cache: EncodingCache | None = None,
        posterior: bool = False,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self._encoders, self.patch, self.cache, self.posterior = encoders, patch, cache, posterior
        self.autocast = autocast

    # What the encoders are, taken once: asking again must not build a released encoder.
    @cached_property
    def latent_channels(self) -> int:
        return self._encoders.autoencoder.latent_channels

    @cached_property
    def text_dim(self) -> int:
        return self._encoders.text_encoder.dim

    @cached_property
    def geometry(self) -> LatentGeometry:
        return LatentGeometry.of(self._encoders.autoencoder, self.patch)

    @cached_property
    def null_caption(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encoders.text_encoder.null_embedding()

    def encoders(self) -> AbstractContextManager[FrozenEncoders]:
        return self._encoders.borrowed()

    @torch.no_grad()
    def encode(self, batch: Batch | PackedBatch, device: torch.device) -> Encoded:
        """A packed batch's clips are encoded a shape group at a time, its captions at once."""
        text = self._text(batch.captions, device)
        if isinstance(batch, PackedBatch):
            means, logvars = zip(
                *(self._latents(g.video, device) for g in batch.groups), strict=True
            )
            return Encoded(list(means), *text, list(logvars) if self.posterior else None)
        latents, logvar = self._latents(batch.video, device)
        return Encoded(latents, *text, logvar)

    def _latents(
        self, video: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The posterior's mean of uint8 clips, and with `posterior` its log-variance."""
        autoencoder = self._encoders.autoencoder
        if self.posterior:
            return autoencoder.posterior(video_to_float(video, device))
        if self.cache is None:
            return autoencoder.encode(video_to_float(video, device)), None
        (latents,) = self.cache.lookup(
            [pixel_key(clip) for clip in video],
            lambda rows: (autoencoder.encode(video_to_float(video[rows], device)),),
            device,
        )
        return latents, None

    @torch.no_grad()
    def given_frame_latents(
        self, batch: Batch, given_pixels: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        video = video_to_float(batch.video, device)
        keep = given_pixels.to(device)[:, None, :, None, None]
        return self._encoders.autoencoder.encode(video * keep)

    def _text(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        text_encoder = self._encoders.text_encoder
        if self.cache is None:
            return text_encoder.encode(captions)
        return self.cache.lookup(
            [("caption", caption) for caption in captions],
            lambda rows: text_encoder.encode([captions[i] for i in rows]),
            device,
        )

    def metrics(self) -> dict[str, float]:
        """The encoding cache's hit share and size."""
        if self.cache is None or not self.cache.store.hits + self.cache.store.misses:
            return {}
        store = self.cache.store
        return {
            "perf/encoding_cache_hit_share": store.hits / (store.hits + store.misses),
            "perf/encoding_cache_mib": store.bytes / 2**20,
        }

    @torch.no_grad()
    def video(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, T, H, W, 3) -> the posterior's normalised mean and log-variance, float32
        on the host."""
        with self.autocast():
            video = video_to_float(clips, self._encoders.device)
            mean, logvar = self._encoders.autoencoder.posterior(video)
        return mean.float().cpu(), logvar.float().cpu()

    @torch.no_grad()
    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> embeddings (B, L, D) in float32 and masks (B, L), on the host."""
        with self.autocast():
            embedding, mask = self._encoders.text_encoder.encode(captions)
        return embedding.float().cpu(), mask.cpu()


# --- latent shards -----------------------------------------------------------------------------


class StoredLatents:
    """Latent shards (`python -m train.encode`): what the DiT needs of the encoders comes from
    their record, and each batch carries its latents and caption embeddings."""

    def __init__(
        self, encoders: FrozenEncoders, folder: str, record: dict, patch, posterior: bool = False
    ):
        self._encoders, self.posterior = encoders, posterior
        latents = record["latents"]
        self.latent_channels, self.text_dim = latents["channels"], record["text"]["dim"]
        self.geometry = LatentGeometry(
            latents["temporal_compression"], latents["spatial_compression"], tuple(patch)
        )
        null_text, null_mask = read_null_caption(folder)
        self.null_caption = (null_text.float().to(encoders.device), null_mask.to(encoders.device))

    @classmethod
    def open(
        cls, config: Config, encoders: FrozenEncoders, folder: str, record: dict, name: str
    ) -> StoredLatents:
        """The latent shards `name` names, checked against the run's config."""
        _check_encoders(config, record, name)
        _check_clips(config, record, name)
        if config.data.augment:
            log.warning(
                "data.augment=true has no effect on latent shards: their clips were cut once, "
                "the middle frames and the centre crop"
            )
        posterior = config.train.sample_posterior
        if posterior and not record["latents"]["logvar"]:
            raise ValueError(
                f"train.sample_posterior=true needs the posterior's log-variance, which "
                f"{name} does not store: encode them again with --logvar"
            )
        return cls(encoders, folder, record, config.model.patch_size, posterior)

    def encoders(self) -> AbstractContextManager[FrozenEncoders]:
        return self._encoders.borrowed()

    def encode(self, batch: Batch | PackedBatch, device: torch.device) -> Encoded:
        """The stored tensors on the device, in float32 like the encoders' outputs."""
        if isinstance(batch, PackedBatch):
            groups = [self.encode(group, device) for group in batch.groups]
            text, mask = padded_captions([g.text for g in groups], [g.mask for g in groups])
            latents = [group.latents for group in groups]
            logvar = [group.logvar for group in groups] if self.posterior else None
            return Encoded(latents, text, mask, logvar)
        stored = batch.latents
        if stored is None:
            raise ValueError(f"a batch of pixels ({batch.keys[:3]}...) from latent shards")

        def moved(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=True).float()

        logvar = moved(stored.logvar) if self.posterior else None
        mask = stored.text_mask.to(device, non_blocking=True)
        return Encoded(moved(stored.mean), moved(stored.text), mask, logvar)

    def given_frame_latents(
        self, batch: Batch, given_pixels: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        raise ValueError(
            "latent shards hold each clip's latents, not those of its given frames alone: a model "
            "that takes given frames as input channels trains on pixel shards"
        )

    def metrics(self) -> dict[str, float]:
        return {}


def padded_captions(
    text: list[torch.Tensor], mask: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption embeddings of several batches as one (B, L, D), padded (masked out) to the
    longest."""
    length = max(t.shape[1] for t in text)
    text = [torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in text]
    mask = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in mask]
    return torch.cat(text), torch.cat(mask)


def _check_encoders(config: Config, record: dict, shards: str) -> None:
    ours = encoder_identity(config, config.data.cache_dir)
    for name in ("autoencoder", "text_encoder"):
        theirs = record["encoders"][name]
        if theirs["identity"] != ours[name]:
            raise ValueError(
                f"{shards} were encoded with the {name} {theirs['where']} (weights sha256 "
                f"{theirs['identity']['weights_sha256'][:12]}, config "
                f"{theirs['identity']['config']}), but this run configures "
                f"{describe_encoders(config)[name]} (weights sha256 "
                f"{ours[name]['weights_sha256'][:12]}, config {ours[name]['config']}): "
                f"configure that {name}, or encode the shards again with this one"
            )


def _check_clips(config: Config, record: dict, shards: str) -> None:
    """The plan must cut the latent shards to the shapes their clips were encoded for."""
    for key, value in _clips(config).items():
        theirs = record["clips"].get(key)
        if theirs != value:
            raise ValueError(
                f"{shards} were encoded with {key}={theirs}, but this run has {value}: the plan "
                "would cut their latents to other shapes; keep the encoding's buckets (or "
                "packing targets) and data.fps (buckets.token_budget, packing.sequence_tokens "
                "and packing.packs_per_rank may change), or encode again"
            )


def _clips(config: Config) -> dict:
    """What decides the shape each sample's latents are encoded at: its bucket, or with packing
    its own target shape."""
    if config.packing.enabled:
        packing = config.packing
        targets = [packing.max_tokens_per_sample, packing.max_frames, packing.max_aspect_change]
        return {"packing": targets, "fps": config.data.fps}
    return {
        "buckets": sorted(config.buckets.buckets),
        "max_aspect_change": config.buckets.max_aspect_change,
        "fps": config.data.fps,
    }


def encoding_record(config: Config, source: OnlineLatents, dtype: str, logvar: bool) -> dict:
    """The `encoding.json` of latent shards that `source` encodes (data/latents.py): what a run
    on them is checked against above."""
    identity, where = encoder_identity(config, config.data.cache_dir), describe_encoders(config)
    geometry = source.geometry
    return {
        "format": RECORD_FORMAT,
        "encoders": {name: {"identity": identity[name], "where": where[name]} for name in identity},
        "latents": {
            "channels": source.latent_channels,
            "temporal_compression": geometry.temporal_compression,
            "spatial_compression": geometry.spatial_compression,
            "dtype": dtype,
            "logvar": logvar,
        },
        "text": {
            "dim": source.text_dim,
            "max_length": config.text_encoder.max_length,
            "dtype": dtype,
        },
        "clips": _clips(config)
        | {"cut": "the middle frames and the centre crop (data.augment=false)"},
        "source": config.data.shards,
    }

"""The frozen encoders of a DiT run, and the latent shards that stand in for them.

`FrozenEncoders` builds the autoencoder and the text encoder on first use. A run on pixel
shards uses them every step. A run on latent shards (`python -m data.encode`) never builds them
for training: it builds them only to encode a held-out set in pixels, or to sample videos, and
frees them after. `LatentShards` is what such a run knows instead: the latents' channels and
compressions, the text embedding's width and the stored empty caption, all from the shards'
record, which must name the same encoders as the run's config.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from data.latents import RECORD_FORMAT, files_digest, latent_folder, read_null_caption
from data.manifest import resolve_sources
from model import autoencoder as autoencoders
from model import text as text_encoders
from model.geometry import LatentGeometry
from train.build import frozen
from train.config import Config

log = logging.getLogger(__name__)
# Keys of an autoencoder config that name where its weights are, not what they compute.
AUTOENCODER_PATH_KEYS = ("checkpoint", "pretrained_path", "kl_weight")


class FrozenEncoders:
    """The run's frozen autoencoder and text encoder, each built on first use."""

    def __init__(self, config: Config, device: torch.device):
        self.config, self.device = config, device
        self._autoencoder: nn.Module | None = None
        self._text_encoder: text_encoders.TextEncoder | None = None

    @property
    def autoencoder(self) -> nn.Module:
        if self._autoencoder is None:
            self._autoencoder = self._build(autoencoders.build_autoencoder, self.config.autoencoder)
        return self._autoencoder

    @property
    def text_encoder(self) -> text_encoders.TextEncoder:
        if self._text_encoder is None:
            self._text_encoder = self._build(text_encoders.TextEncoder, self.config.text_encoder)
        return self._text_encoder

    def _build(self, build: Callable, cfg) -> nn.Module:
        """Under a forked RNG: building (a random init before the weights load) leaves the run's
        random state as it was, so the DiT starts the same whether or when an encoder is built."""
        with torch.random.fork_rng(devices=[]):
            return frozen(build(cfg), self.device)

    @property
    def loaded(self) -> list[str]:
        """Which of the two are in memory."""
        names = {"autoencoder": self._autoencoder, "text_encoder": self._text_encoder}
        return [name for name, module in names.items() if module is not None]

    def release(self) -> None:
        """Drop both and return their memory (a later use builds them again)."""
        self._autoencoder = self._text_encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def encoder_identity(config: Config, cache_dir: str) -> dict:
    """What the configured encoders compute: their output-deciding config and a digest of
    their weight files (wherever those live), as latent shards record it."""
    autoencoder = {
        k: v for k, v in asdict(config.autoencoder).items() if k not in AUTOENCODER_PATH_KEYS
    }
    text = {"max_length": config.text_encoder.max_length}
    return {
        "autoencoder": {
            "config": autoencoder,
            "weights_sha256": files_digest(
                autoencoders.weight_files(config.autoencoder), cache_dir
            ),
        },
        "text_encoder": {
            "config": text,
            "weights_sha256": files_digest(
                text_encoders.weight_files(config.text_encoder), cache_dir
            ),
        },
    }


def describe_encoders(config: Config) -> dict[str, str]:
    """Where the configured encoders' weights are, for messages and the record."""
    ae = config.autoencoder
    where = ae.pretrained_path if ae.kind == "diffusers" else ae.checkpoint
    text = config.text_encoder.path or text_encoders.default_text_encoder_path()
    return {"autoencoder": f"{ae.kind} {where or '(random init)'}", "text_encoder": text}


def encoding_record(config: Config, encoders: FrozenEncoders, dtype: str, logvar: bool) -> dict:
    """The `encoding.json` of latent shards made with the run's encoders (data/latents.py)."""
    identity, where = encoder_identity(config, config.data.cache_dir), describe_encoders(config)
    autoencoder, text_encoder = encoders.autoencoder, encoders.text_encoder
    return {
        "format": RECORD_FORMAT,
        "encoders": {name: {"identity": identity[name], "where": where[name]} for name in identity},
        "latents": {
            "channels": autoencoder.latent_channels,
            "temporal_compression": autoencoder.temporal_compression,
            "spatial_compression": autoencoder.spatial_compression,
            "dtype": dtype,
            "logvar": logvar,
        },
        "text": {"dim": text_encoder.dim, "max_length": text_encoder.max_length, "dtype": dtype},
        "clips": {
            "buckets": sorted(config.buckets.buckets),
            "max_aspect_change": config.buckets.max_aspect_change,
            "fps": config.data.fps,
            "cut": "the middle frames and the centre crop (data.augment=false)",
        },
        "source": config.data.shards,
    }


@dataclass
class LatentShards:
    """What a run on latent shards takes from their record instead of from the encoders."""

    folder: str
    record: dict
    null_caption: tuple[torch.Tensor, torch.Tensor]

    @property
    def latent_channels(self) -> int:
        return self.record["latents"]["channels"]

    @property
    def text_dim(self) -> int:
        return self.record["text"]["dim"]

    def geometry(self, patch) -> LatentGeometry:
        latents = self.record["latents"]
        return LatentGeometry(
            latents["temporal_compression"], latents["spatial_compression"], tuple(patch)
        )


def open_latent_shards(
    config: Config, shards: str, key: str = "data.shards"
) -> LatentShards | None:
    """The latent shards `shards` names, checked against the run's config before any model is
    built; None for pixel shards."""
    found = latent_folder(resolve_sources(shards))
    if found is None:
        return None
    folder, record = found
    _check_encoders(config, record, f"{key}={shards!r}")
    _check_clips(config, record, f"{key}={shards!r}")
    if config.data.augment:
        log.warning(
            "data.augment=true has no effect on latent shards: their clips were cut once, the "
            "middle frames and the centre crop"
        )
    if config.train.sample_posterior and not record["latents"]["logvar"]:
        raise ValueError(
            f"train.sample_posterior=true needs the posterior's log-variance, which "
            f"{key}={shards!r} does not store: encode them again with --logvar"
        )
    null_text, null_mask = read_null_caption(folder)
    return LatentShards(folder, record, (null_text.float(), null_mask))


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
    """The plan must cut the latent shards into the buckets their clips were encoded for."""
    clips = record["clips"]
    ours = {
        "buckets": sorted(config.buckets.buckets),
        "max_aspect_change": config.buckets.max_aspect_change,
        "fps": config.data.fps,
    }
    for key, value in ours.items():
        if clips[key] != value:
            raise ValueError(
                f"{shards} were encoded with {key}={clips[key]}, but this run has {value}: "
                "the plan would put their latents in other buckets; keep the encoding's "
                "buckets and data.fps (buckets.token_budget may change), or encode again"
            )

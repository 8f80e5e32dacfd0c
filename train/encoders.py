"""The frozen encoders of a DiT run (the video autoencoder and the text encoder), and what they
are.

`FrozenEncoders` builds each on first use and, unless training encodes with them every step,
frees them at the end of the block that needed them (train/latent_source.py decides which).
`encoder_identity` is what the encoders compute (their output-deciding config and a digest of
their weight files): latent shards record it (train/latent_source.py), and a run on them must
configure the same.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict

import torch
from torch import nn

from data.latents import files_digest
from model import autoencoder as autoencoders
from model import text as text_encoders
from train.build import frozen
from train.config import Config

# Keys of an autoencoder config that name where its weights are or how it schedules its work,
# not what they compute.
AUTOENCODER_PATH_KEYS = ("checkpoint", "pretrained_path", "kl_weight", "chunk_latent_frames")


def video_to_float(video_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) in [-1, 1], converted on the device."""
    video = video_uint8.to(device, non_blocking=True).permute(0, 4, 1, 2, 3)
    return video.float().div_(127.5).sub_(1.0)


class FrozenEncoders:
    """The run's frozen autoencoder and text encoder, each built on first use. `keep`: training
    encodes with them every step, so they stay in memory; otherwise `borrowed()` blocks build
    what they use and free it at their end."""

    def __init__(self, config: Config, device: torch.device, keep: bool = True):
        self.config, self.device, self.keep = config, device, keep
        self._autoencoder: nn.Module | None = None
        self._text_encoder: nn.Module | None = None

    @property
    def autoencoder(self) -> nn.Module:
        if self._autoencoder is None:
            self._autoencoder = self._build(autoencoders.build_autoencoder, self.config.autoencoder)
        return self._autoencoder

    @property
    def text_encoder(self) -> nn.Module:
        if self._text_encoder is None:
            self._text_encoder = self._build(
                text_encoders.build_text_encoder, self.config.text_encoder
            )
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

    @contextmanager
    def borrowed(self) -> Iterator[FrozenEncoders]:
        """These encoders for a block; what it builds is freed at its end unless kept."""
        try:
            yield self
        finally:
            if not self.keep:
                self.release()

    def release(self) -> None:
        """Drop both and return their memory (a later use builds them again)."""
        if not self.loaded:
            return
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
    # Shards from before these choices were encoded as the defaults are.
    if config.text_encoder.padding != "masked":
        text["padding"] = config.text_encoder.padding
    if config.text_encoder.kind != "auto":
        text["kind"] = config.text_encoder.kind
        text["template_crop"] = config.text_encoder.template_crop
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

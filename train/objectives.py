"""What a training step optimises, per stage: flow matching for the DiT, reconstruction
plus KL for the autoencoder. Each objective turns one batch into a summed loss and the
number of samples it covers, so the trainer can normalise over the whole global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from data.lru import ByteLRU
from data.pipeline import Batch
from model.conditioning import ConditioningConfig, draw_given_frames
from model.flow import FlowConfig, drop_captions, sample_timesteps, training_loss
from model.geometry import LatentGeometry


@dataclass
class Loss:
    """One batch's summed loss and what it covered."""

    total: torch.Tensor  # sum over the batch's samples of each sample's mean loss
    samples: int
    tokens: int  # latent tokens (DiT) or pixels per frame position (autoencoder)
    flops: float = 0.0  # training FLOPs of this batch, for MFU (0 when unknown)


def video_to_float(video_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) in [-1, 1], converted on the device."""
    video = video_uint8.to(device, non_blocking=True).permute(0, 4, 1, 2, 3)
    return video.float().div_(127.5).sub_(1.0)


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


class Encoders(Protocol):
    """The frozen encoders an objective runs on batches of pixels (train/encoders.py)."""

    autoencoder: nn.Module
    text_encoder: nn.Module


@dataclass
class Encoded:
    """A batch as the DiT takes it: latents (the posterior's mean) and caption embeddings."""

    latents: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor
    logvar: torch.Tensor | None = None  # only with train.sample_posterior


class FlowMatchingObjective:
    """Flow matching on the latents of a frozen autoencoder, with frame conditioning (a mode and
    its given frames drawn per sample) and the micro-conditions frame rate and native size.
    A batch from latent shards carries its latents and caption embeddings, and no encoder runs;
    caption dropout then uses the shards' stored empty caption, `null_caption`."""

    def __init__(
        self,
        encoders: Encoders,
        null_caption: tuple[torch.Tensor, torch.Tensor],
        flow: FlowConfig,
        conditioning: ConditioningConfig,
        geometry: LatentGeometry,
        train_flops: Callable[[int], float],
        seed: int,
        cache: EncodingCache | None = None,
        sample_posterior: bool = False,
    ):
        self.seed = seed
        self.cache = cache
        self.train_flops = train_flops  # per sample, from its number of latent tokens
        self.encoders = encoders
        self.flow = flow
        self.conditioning = conditioning
        self.geometry = geometry
        self.null_text, self.null_mask = null_caption
        self.sample_posterior = sample_posterior

    def num_tokens(self, latents: torch.Tensor) -> int:
        return self.geometry.latent_tokens(latents.shape[2:])

    @torch.no_grad()
    def encode(self, batch: Batch, device: torch.device) -> Encoded:
        """A batch's latents and caption embeddings: stored in latent shards, or encoded (from
        the cache where it has them)."""
        if batch.latents is not None:
            return self._stored(batch, device)
        autoencoder, text_encoder = self.encoders.autoencoder, self.encoders.text_encoder
        if self.sample_posterior:  # refused with the cache (train/config.py)
            latents, logvar = autoencoder.posterior(video_to_float(batch.video, device))
            return Encoded(latents, *text_encoder.encode(batch.captions), logvar)
        if self.cache is None:
            latents = autoencoder.encode(video_to_float(batch.video, device))
            return Encoded(latents, *text_encoder.encode(batch.captions))
        video, captions = batch.video, batch.captions
        (latents,) = self.cache.lookup(
            [pixel_key(clip) for clip in video],
            lambda rows: (autoencoder.encode(video_to_float(video[rows], device)),),
            device,
        )
        text, mask = self.cache.lookup(
            [("caption", caption) for caption in captions],
            lambda rows: text_encoder.encode([captions[i] for i in rows]),
            device,
        )
        return Encoded(latents, text, mask)

    def _stored(self, batch: Batch, device: torch.device) -> Encoded:
        """Latent shards' tensors on the device, in float32 like the encoders' outputs."""

        def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True).float()

        logvar = moved(batch.latent_logvar) if self.sample_posterior else None
        mask = batch.text_mask.to(device, non_blocking=True)
        return Encoded(moved(batch.latents), moved(batch.text), mask, logvar)

    def metrics(self) -> dict[str, float]:
        """What the objective has to report beside the loss: the encoding cache's hit share."""
        if self.cache is None or not self.cache.store.hits + self.cache.store.misses:
            return {}
        store = self.cache.store
        return {
            "perf/encoding_cache_hit_share": store.hits / (store.hits + store.misses),
            "perf/encoding_cache_mib": store.bytes / 2**20,
        }

    def generator(self, batch: Batch, device: torch.device, stream: int = 0) -> torch.Generator:
        """Randomness seeded by the batch's place in the global data plan, so a batch gets the
        same times, noise, caption dropout and conditioning frames on any number of ranks and
        after a resume; `stream` keeps independent draws apart."""
        seed = np.random.SeedSequence([self.seed, batch.epoch, batch.plan_index, stream])
        return torch.Generator(device).manual_seed(int(seed.generate_state(1, np.uint64)[0]))

    def __call__(self, model: nn.Module, batch: Batch, device: torch.device) -> Loss:
        encoded = self.encode(batch, device)
        latents = encoded.latents
        if self.sample_posterior:
            draws = self.generator(batch, device, stream=2)
            noise = torch.randn(latents.shape, generator=draws, device=device)
            latents = latents + torch.exp(0.5 * encoded.logvar) * noise
        generator = self.generator(batch, device)
        text, mask = drop_captions(
            encoded.text,
            encoded.mask,
            self.null_text,
            self.null_mask,
            self.flow.caption_dropout,
            generator,
        )
        batch_size, num_tokens = latents.shape[0], self.num_tokens(latents)
        t = sample_timesteps(batch_size, num_tokens, self.flow, generator, device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        masks = self.generator(batch, torch.device("cpu"), stream=1)  # drawn on the CPU
        given = draw_given_frames(batch_size, latents.shape[2], self.conditioning, masks)
        micro = {"fps": batch.fps.to(device), "native_size": batch.native_size.to(device)}
        per_sample = training_loss(
            model, latents, text, mask, t, noise, given=given.to(device), model_kwargs=micro
        )
        return Loss(
            per_sample.sum(),
            batch_size,
            batch_size * num_tokens,
            batch_size * self.train_flops(num_tokens),
        )


class AutoencoderObjective:
    """Reconstruction + KL of the video autoencoder being trained."""

    def metrics(self) -> dict[str, float]:
        return {}

    def __call__(self, model: nn.Module, batch: Batch, device: torch.device) -> Loss:
        video = video_to_float(batch.video, device)
        losses = model(video)
        batch_size = video.shape[0]
        return Loss(losses["loss"] * batch_size, batch_size, video[:, 0].numel())

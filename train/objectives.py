"""What a training step optimises, per stage: flow matching for the DiT, reconstruction
plus KL for the autoencoder. Each objective turns one batch into a summed loss and the
number of samples it covers, so the trainer can normalise over the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from data.pipeline import Batch, PackedBatch
from model.conditioning import ConditioningConfig, draw_given_frames
from model.flow import FlowConfig, drop_captions, sample_timesteps, training_loss
from model.pretrained import channel_condition, given_pixel_frames
from train.encoders import video_to_float
from train.latent_source import Encoded, LatentSource


@dataclass
class Loss:
    """One batch's summed loss and what it covered."""

    total: torch.Tensor  # sum over the batch's samples of each sample's mean loss
    samples: int
    tokens: int  # latent tokens (DiT) or pixels per frame position (autoencoder)
    flops: float = 0.0  # training FLOPs of this batch, for MFU (0 when unknown)


class Objective(Protocol):
    """What the trainer calls: one batch's loss, and what to report beside it."""

    def __call__(
        self, model: nn.Module, batch: Batch | PackedBatch, device: torch.device
    ) -> Loss: ...

    def metrics(self) -> dict[str, float]: ...


class FlowMatchingObjective:
    """Flow matching on the latents of a frozen autoencoder, which `source` gives (encoded
    online or stored: train/latent_source.py), with frame conditioning (a mode and its given
    frames drawn per sample) and the micro-conditions frame rate and native size. With the
    posterior's log-variance (train.sample_posterior) the latents are a draw from it.

    `given_as_channels`: the model is shown the given frames as input channels (Wan 2.2 I2V,
    model/pretrained.py `channel_condition`) instead of keeping them clean, so every latent frame
    is noised and scored, as its pipeline denoises every frame."""

    def __init__(
        self,
        source: LatentSource,
        flow: FlowConfig,
        conditioning: ConditioningConfig,
        train_flops: Callable[[int], float],
        seed: int,
        given_as_channels: bool = False,
    ):
        self.source = source
        self.flow = flow
        self.conditioning = conditioning
        self.train_flops = train_flops  # per sample, from its number of latent tokens
        self.seed = seed
        self.given_as_channels = given_as_channels

    def metrics(self) -> dict[str, float]:
        return self.source.metrics()

    def generator(self, batch: Batch, device: torch.device, stream: int = 0) -> torch.Generator:
        """Randomness seeded by the batch's place in the global data plan, so a batch gets the
        same times, noise, caption dropout and conditioning frames on any number of ranks and
        after a resume; `stream` keeps independent draws apart."""
        seed = np.random.SeedSequence([self.seed, batch.epoch, batch.plan_index, stream])
        return torch.Generator(device).manual_seed(int(seed.generate_state(1, np.uint64)[0]))

    def dropped_captions(
        self, encoded: Encoded, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The captions, each replaced by the empty one with probability flow.caption_dropout."""
        return drop_captions(
            encoded.text,
            encoded.mask,
            *self.source.null_caption,
            self.flow.caption_dropout,
            generator,
        )

    def __call__(self, model: nn.Module, batch: Batch, device: torch.device) -> Loss:
        encoded = self.source.encode(batch, device)
        draws = self.generator(batch, device, stream=2)
        latents = posterior_sample(encoded.latents, encoded.logvar, draws)
        generator = self.generator(batch, device)
        text, mask = self.dropped_captions(encoded, generator)
        batch_size = latents.shape[0]
        num_tokens = self.source.geometry.latent_tokens(latents.shape[2:])
        t = sample_timesteps(batch_size, num_tokens, self.flow, generator, device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        masks = self.generator(batch, torch.device("cpu"), stream=1)  # drawn on the CPU
        given = draw_given_frames(batch_size, latents.shape[2], self.conditioning, masks)
        given = given.to(device)
        micro = {"fps": batch.fps.to(device), "native_size": batch.native_size.to(device)}
        if self.given_as_channels:  # shown as input channels, not kept clean
            micro["condition"], given = self.given_channels(batch, given, device), None
        per_sample = training_loss(
            model, latents, text, mask, t, noise, given=given, model_kwargs=micro
        )
        return Loss(
            per_sample.sum(),
            batch_size,
            batch_size * num_tokens,
            batch_size * self.train_flops(num_tokens),
        )

    def given_channels(
        self, batch: Batch, given: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """The given latent frames (B, T) as the input channels the model is shown."""
        compression = self.source.geometry.temporal_compression
        pixels = given_pixel_frames(given, compression)
        latents = self.source.given_frame_latents(batch, pixels, device)
        return channel_condition(latents, pixels.to(device), compression)


class PackedFlowMatchingObjective(FlowMatchingObjective):
    """Flow matching on a rank's packs (data/packing.py): each sample gets its own flow time
    (shifted for its own number of tokens), noise, caption dropout and given frames, drawn a
    shape group at a time from the batch's place in the plan, and the DiT runs all the samples
    as one packed sequence. The loss is the same sum of per-sample means as unpacked, so every
    sample weighs the same whatever its size."""

    def __call__(self, model: nn.Module, batch: PackedBatch, device: torch.device) -> Loss:
        encoded = self.source.encode(batch, device)
        draws = self.generator(batch, device, stream=2)
        logvar = encoded.logvar or [None] * len(encoded.latents)
        latents = [
            posterior_sample(mean, lv, draws)
            for mean, lv in zip(encoded.latents, logvar, strict=True)
        ]
        generator = self.generator(batch, device)
        text, mask = self.dropped_captions(encoded, generator)
        tokens = [self.source.geometry.latent_tokens(x.shape[2:]) for x in latents]
        t = torch.cat(
            [
                sample_timesteps(len(x), n, self.flow, generator, device)
                for x, n in zip(latents, tokens, strict=True)
            ]
        )
        noise = [torch.randn(x.shape, generator=generator, device=device) for x in latents]
        masks = self.generator(batch, torch.device("cpu"), stream=1)  # drawn on the CPU
        given = [
            draw_given_frames(len(x), x.shape[2], self.conditioning, masks).to(device)
            for x in latents
        ]
        micro = {
            "fps": batch.fps.to(device),
            "native_size": batch.native_size.to(device),
            "sequence_length": batch.sequence_length,
        }
        per_sample = training_loss(
            model, latents, text, mask, t, noise, given=given, model_kwargs=micro
        )
        return Loss(
            per_sample.sum(),
            len(per_sample),
            sum(len(x) * n for x, n in zip(latents, tokens, strict=True)),
            sum(len(x) * self.train_flops(n) for x, n in zip(latents, tokens, strict=True)),
        )


def posterior_sample(
    mean: torch.Tensor, logvar: torch.Tensor | None, draws: torch.Generator
) -> torch.Tensor:
    """The posterior's mean, or with its log-variance a draw from it."""
    if logvar is None:
        return mean
    noise = torch.randn(mean.shape, generator=draws, device=draws.device)
    return mean + torch.exp(0.5 * logvar) * noise


class AutoencoderObjective:
    """Reconstruction + KL of the video autoencoder being trained."""

    def metrics(self) -> dict[str, float]:
        return {}

    def __call__(self, model: nn.Module, batch: Batch, device: torch.device) -> Loss:
        video = video_to_float(batch.video, device)
        losses = model(video)
        batch_size = video.shape[0]
        return Loss(losses["loss"] * batch_size, batch_size, video[:, 0].numel())

"""Frame conditioning: which latent frames of a training sample are given.

Given frames stay clean (flow time 0), the DiT is told which they are, and they carry no loss, so
one model learns text-to-video and every "continue from these frames" task at once. Per sample a
mode is drawn with the configured probabilities:

    t2v              nothing given
    i2v              the first latent frame (= the first pixel frame with a causal autoencoder)
    extend_forward   the first k latent frames (the model continues a video)
    extend_backward  the last k latent frames (the model makes what came before)
    connect          the first k and the last k latent frames (a transition between two videos)
    random_frames    k latent frames anywhere

k is drawn from `given_frames` and clipped so that at least one frame stays noisy; a mode a sample
is too short for (any mode for a 1-frame image, connect for fewer than 3 frames) becomes t2v.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MODES = ("t2v", "i2v", "extend_forward", "extend_backward", "connect", "random_frames")


@dataclass
class ConditioningConfig:
    # Probabilities of the modes per training sample; they must sum to 1.
    t2v: float = 1.0
    i2v: float = 0.0
    extend_forward: float = 0.0
    extend_backward: float = 0.0
    connect: float = 0.0
    random_frames: float = 0.0
    # [min, max] latent frames given by extend / random_frames, and by each end of connect.
    given_frames: list[int] = field(default_factory=lambda: [1, 2])


def mode_probabilities(cfg: ConditioningConfig) -> Tensor:
    """The modes' probabilities in MODES order, validated."""
    probabilities = torch.tensor([getattr(cfg, mode) for mode in MODES], dtype=torch.float64)
    if (probabilities < 0).any() or abs(probabilities.sum().item() - 1.0) > 1e-6:
        values = ", ".join(f"{mode}={getattr(cfg, mode)}" for mode in MODES)
        raise ValueError(f"conditioning probabilities must be >= 0 and sum to 1, got {values}")
    low_high = cfg.given_frames
    if len(low_high) != 2 or not 1 <= low_high[0] <= low_high[1]:
        raise ValueError(
            f"conditioning.given_frames must be [min, max] with 1 <= min <= max, got {low_high}"
        )
    return probabilities


def given_mask(mode: str, frames: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """(frames,) bool: the latent frames `mode` gives, k per end, always leaving one noisy."""
    given = torch.zeros(frames, dtype=torch.bool)
    if frames < 2 or mode == "t2v":
        return given
    k = min(k, frames - 1)
    if mode == "i2v":
        given[0] = True
    elif mode == "extend_forward":
        given[:k] = True
    elif mode == "extend_backward":
        given[frames - k :] = True
    elif mode == "connect":
        k = min(k, (frames - 1) // 2)
        if k >= 1:
            given[:k] = given[frames - k :] = True
    elif mode == "random_frames":
        given[torch.randperm(frames, generator=generator)[:k]] = True
    else:
        raise ValueError(f"unknown conditioning mode {mode!r}; known modes: {', '.join(MODES)}")
    return given


def draw_given_frames(
    batch_size: int,
    frames: int,
    cfg: ConditioningConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(batch_size, frames) bool: a mode and its given latent frames drawn for every sample.

    Draws on the CPU from `generator` (the global torch RNG when None, so a resumed run draws
    the same masks as an uninterrupted one).
    """
    probabilities = mode_probabilities(cfg)
    modes = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
    low, high = cfg.given_frames
    ks = torch.randint(low, high + 1, (batch_size,), generator=generator)
    return torch.stack(
        [
            given_mask(MODES[mode], frames, k, generator)
            for mode, k in zip(modes.tolist(), ks.tolist(), strict=True)
        ]
    )

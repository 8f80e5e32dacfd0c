"""Small models shared by tests."""

from __future__ import annotations

import torch

from model.dit import DiT, dit_config
from train.encoders import FrozenEncoders
from train.latent_source import EncodingCache, OnlineLatents


def perturbed_tiny_dit(in_channels: int, text_dim: int, scale: float = 0.05) -> DiT:
    """The tiny DiT with every weight perturbed (seed 0): adaLN-Zero's closed branches open, so
    every input and every parameter matters."""
    torch.manual_seed(0)
    model = DiT(dit_config("tiny"), in_channels, text_dim)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def online_source(
    cfg, encoders: FrozenEncoders, cache: EncodingCache | None = None
) -> OnlineLatents:
    """The pixel shards' latent source of a composed config, on already built encoders."""
    return OnlineLatents(encoders, cfg.model.patch_size, cache)

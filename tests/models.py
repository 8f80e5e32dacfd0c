"""Small models shared by tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from model.dit import DiT, dit_config
from model.geometry import LatentGeometry
from train.objectives import EncodingCache, FlowMatchingObjective


def perturbed_tiny_dit(in_channels: int, text_dim: int, scale: float = 0.05) -> DiT:
    """The tiny DiT with every weight perturbed (seed 0): adaLN-Zero's closed branches open, so
    every input and every parameter matters."""
    torch.manual_seed(0)
    model = DiT(dit_config("tiny"), in_channels, text_dim)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def flow_objective(cfg, autoencoder, text_encoder, cache: EncodingCache | None = None):
    """The training objective of a composed config, without a FLOP count."""
    return FlowMatchingObjective(
        SimpleNamespace(autoencoder=autoencoder, text_encoder=text_encoder),
        text_encoder.null_embedding(),
        cfg.flow,
        cfg.conditioning,
        LatentGeometry.of(autoencoder, cfg.model.patch_size),
        lambda tokens: 0.0,
        cfg.train.seed,
        cache,
    )

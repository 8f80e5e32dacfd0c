"""Exponential moving average of a model's weights, sharded like the model.

The average is kept over the engine's local pieces of each parameter (full tensors for one
process, DDP and ZeRO 1-2, DTensor shards for FSDP, flat partitions for ZeRO-3), so it costs each
rank what its share of the weights costs. As a checkpoint component, its state is the full
weights, which the engine consolidates (collective); `EMAShards` is the component of a sharded
checkpoint instead, which is never consolidated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from train.torch_private import lerp_all_


class EMA:
    def __init__(self, engine, decay: float):
        self.engine, self.decay = engine, decay
        self.shadow = {name: p.detach().clone() for name, p in engine.local_params().items()}

    @torch.no_grad()
    def update(self, pieces: dict[str, Tensor]) -> None:
        names = list(self.shadow)
        lerp_all_(
            [self.shadow[n] for n in names], [pieces[n].detach() for n in names], 1.0 - self.decay
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The full averaged weights, gathered on every rank (collective)."""
        return self.engine.full_tensors(self.shadow)

    def load_state_dict(self, full: dict[str, Tensor]) -> None:
        mismatch = set(self.shadow) ^ set(full)
        if mismatch:
            raise KeyError(f"EMA state does not match the model: {sorted(mismatch)[:5]}")
        self.engine.load_full(self.shadow, full)


class EMAShards:
    """The EMA as a component of a sharded checkpoint: each rank's own pieces (DTensors), which
    torch.distributed.checkpoint writes as they are and reshards on load, so no rank ever holds
    the full average."""

    def __init__(self, ema: EMA):
        self.ema = ema

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.ema.shadow)

    @torch.no_grad()
    def load_state_dict(self, pieces: dict[str, Tensor]) -> None:
        mismatch = set(self.ema.shadow) ^ set(pieces)
        if mismatch:
            raise KeyError(f"EMA state does not match the model: {sorted(mismatch)[:5]}")
        for name, piece in pieces.items():
            if piece is not self.ema.shadow[name]:
                self.ema.shadow[name].copy_(piece)

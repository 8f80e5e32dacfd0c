"""Exponential moving average of a model's weights, sharded like the model.

The average is kept over the engine's local pieces of each parameter (full tensors for one
process, DDP and ZeRO 1-2, DTensor shards for FSDP, flat partitions for ZeRO-3), so it costs each
rank what its share of the weights costs. The engine consolidates it for checkpoints, sampling and
export.
"""

from __future__ import annotations

import torch
from torch import Tensor

from train.torch_private import lerp_all_


class EMA:
    def __init__(self, pieces: dict[str, Tensor], decay: float):
        self.decay = decay
        self.shadow = {name: piece.detach().clone() for name, piece in pieces.items()}

    @torch.no_grad()
    def update(self, pieces: dict[str, Tensor]) -> None:
        names = list(self.shadow)
        lerp_all_(
            [self.shadow[n] for n in names], [pieces[n].detach() for n in names], 1.0 - self.decay
        )

    def load_full(self, engine, full: dict[str, Tensor]) -> None:
        """Restore from consolidated tensors (a checkpoint's ema.safetensors)."""
        mismatch = set(self.shadow) ^ set(full)
        if mismatch:
            raise KeyError(f"EMA state does not match the model: {sorted(mismatch)[:5]}")
        engine.load_full(self.shadow, full)

"""Exponential moving average of a model's weights, sharded like the model.

The average is kept over the engine's local pieces of each parameter (full tensors for one
process, DDP and ZeRO 1-2, DTensor shards for FSDP, flat partitions for ZeRO-3), so it costs each
rank what its share of the weights costs. The engine consolidates it for checkpoints, sampling and
export: as a checkpoint component, its state is the full weights, whatever the sharding.
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

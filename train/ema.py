"""Exponential moving average of a model's weights, kept beside the model.

The copy has the same structure as the live parameters (a sharded model gives a sharded
EMA), and it is what sampling and export use by default.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        names = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [params[n].detach() for n in names], 1.0 - self.decay
        )

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (a module of the same structure)."""
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in self.shadow.items():
                params[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                self.shadow[name].copy_(value)

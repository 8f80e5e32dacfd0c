"""The one interface the trainer uses to update a model: backward, step, state.

A backend (one process, DDP, FSDP2, DeepSpeed ZeRO) owns how gradients are reduced,
clipped and applied; the trainer never branches on which one it has.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import OptimConfig


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of cfg.lr at each step: linear warmup, then the chosen decay to a floor."""

    def multiplier(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        decay = (
            0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        )
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return multiplier


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.AdamW:
    # Norms, biases and embeddings-like 1-D parameters are not decayed.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    on_cuda = any(p.is_cuda for p in decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=on_cuda)


class LocalEngine:
    """A model updated in this process alone."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, total_steps: int):
        self.model = model
        self.cfg = cfg
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, total_steps)
        )

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, apply and clear the gradients; returns the global grad norm before clipping."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_engine(backend: str, model: nn.Module, cfg: OptimConfig, total_steps: int) -> LocalEngine:
    if backend == "none":
        return LocalEngine(model, cfg, total_steps)
    raise ValueError(f"parallel.backend={backend!r} is not available")

"""Distribution of the DiT over ranks: the mesh (dims.py), parallelisms applied as function calls
(parallelize.py, sequence.py) and the engines behind the trainer's one interface (engines.py,
zero.py)."""

from __future__ import annotations

import torch
from torch import nn

from train.config import OptimConfig, ParallelConfig
from train.parallel.dims import ParallelDims
from train.parallel.engines import FSDPEngine, LocalEngine
from train.parallel.parallelize import parallelize
from train.parallel.zero import build_deepspeed


def build_engine(
    model: nn.Module,
    cfg: ParallelConfig,
    optim: OptimConfig,
    dims: ParallelDims,
    grad_accum: int,
    total_steps: int,
    param_dtype: torch.dtype | None = None,
):
    """Parallelise `model` as configured and wrap it in its backend's engine."""
    wrapped = parallelize(model, cfg, dims, param_dtype)
    if dims.backend.startswith("zero"):
        return build_deepspeed(model, cfg, optim, dims, grad_accum, total_steps, param_dtype)
    if dims.backend == "fsdp":
        return FSDPEngine(model, model, optim, total_steps)
    return LocalEngine(wrapped, model, optim, total_steps)


__all__ = ["ParallelDims", "build_engine"]

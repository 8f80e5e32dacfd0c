"""DeepSpeed ZeRO: its JSON config generated from the Hydra config, and the engine built on it.

Everything the trainer already decides (optimizer, LR schedule, clipping, precision, gradient
accumulation) is written into the generated config, so the ZeRO stages optimise exactly what the
torch backends do; a user JSON (`parallel.deepspeed_config`) is merged over it for anything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from train.config import OptimConfig, ParallelConfig
from train.parallel.dims import ParallelDims
from train.parallel.engines import DeepSpeedEngine, lr_lambda, param_groups
from train.state import deepspeed_records


def deepspeed_config(
    cfg: ParallelConfig,
    optim: OptimConfig,
    dims: ParallelDims,
    grad_accum: int,
    param_dtype: torch.dtype | None,
) -> dict:
    stage = int(dims.backend.removeprefix("zero"))
    zero: dict = {"stage": stage}
    if cfg.zero_offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        # The trainer feeds bucketed batches of varying size itself; DeepSpeed only needs a
        # consistent nominal batch to count micro-batches.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": grad_accum * dims.dp_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": param_dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
    }
    if cfg.deepspeed_config:
        config = _merge(config, _read_user_config(Path(cfg.deepspeed_config)))
    return config


def build_deepspeed(
    model: nn.Module,
    cfg: ParallelConfig,
    optim: OptimConfig,
    dims: ParallelDims,
    grad_accum: int,
    total_steps: int,
    param_dtype: torch.dtype | None,
) -> DeepSpeedEngine:
    import deepspeed  # imported only for ZeRO runs: it is slow to import

    config = deepspeed_config(cfg, optim, dims, grad_accum, param_dtype)
    # DeepSpeed reads LOCAL_RANK itself; a lone process started without torchrun has none.
    os.environ.setdefault("LOCAL_RANK", "0")
    ds_engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(optim, model),
        config=config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(optim, total_steps)
        ),
    )
    ds_engine.checkpoint_engine = _weights_only_checkpoint_engine()
    return DeepSpeedEngine(ds_engine, config["zero_optimization"]["stage"])


def _weights_only_checkpoint_engine():
    """DeepSpeed's file engine, but loading with torch.load(weights_only=True): its checkpoints
    hold tensors, plain containers and DeepSpeed's few record types, and nothing else may be
    unpickled from a file. It saves in torch's zip format, as DeepSpeed's own engine does by
    default, which zero_to_fp32 memory-maps to consolidate the weights."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            torch.save(state_dict, path)

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_records()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


def _read_user_config(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"parallel.deepspeed_config={path}: cannot read it: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"parallel.deepspeed_config={path}: must hold a JSON object")
    return values


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value)
        else:
            merged[key] = value
    return merged

"""The engines behind the trainer's one interface, whatever the backend:

    engine.model                 what the forward pass is called on
    engine.micro_step(loss)      backward of one micro-batch; DeepSpeed also reduces, clips and
                                 applies the update inside the step's last one
    engine.finish_step() -> grad norm  end the step: the torch engines reduce, clip and apply
                                 the gradients here; every engine clears them. With a NaN/Inf
                                 gradient norm nothing is applied
    engine.lr                    the learning rate of the step just taken
    engine.local_params()        this rank's piece of every trainable parameter, by name
    engine.full_tensors(pieces)  the full tensors of such pieces (collective)
    engine.load_full(pieces, full)  copy full tensors into such pieces
    engine.checkpoint_format     how a checkpoint holds what only it holds (model, optimizer, LR
                                 schedule): "full", "sharded" or "deepspeed" (train/checkpoint.py
                                 turns that into files)
    engine.check_resumable(layout)  refuse, clearly, a checkpoint layout it cannot read

`LocalEngine` serves one process and DDP (full parameters everywhere), `FSDPEngine` FSDP2
(DTensor shards), `DeepSpeedEngine` ZeRO stages 1-3. Gradients are averaged over every rank;
the trainer scales each rank's loss so that this average is the global batch's mean.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from train.config import OptimConfig
from train.state import ModelState, NotResumable, OptimizerState


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


def param_groups(cfg: OptimConfig, model: nn.Module) -> list[dict]:
    # Norms, biases and other 1-D parameters are not decayed.
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.AdamW:
    on_cuda = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(cfg, model), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=on_cuda
    )


class TorchEngine:
    """A torch optimizer and LR schedule over `module`, whose forward runs through `model`; its
    checkpoint components are `scheduler`, `model_state` and `optimizer_state`."""

    def __init__(self, model: nn.Module, module: nn.Module, cfg: OptimConfig, total_steps: int):
        self.model, self.module, self.cfg = model, module, cfg
        self.optimizer = build_optimizer(cfg, module)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, total_steps)
        )
        self.model_state = ModelState(module)
        self.optimizer_state = OptimizerState(module, self.optimizer)

    def micro_step(self, loss: Tensor) -> None:
        loss.backward()

    def finish_step(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):  # a NaN/Inf step is dropped whole, as DeepSpeed does
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def local_params(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}


def _refuse(layout: dict, reason: str) -> None:
    raise NotResumable(
        f"written by parallel.backend={layout['backend']} on "
        f"{layout.get('world_size', 1)} ranks; {reason}"
    )


class LocalEngine(TorchEngine):
    """Full parameters on every rank: one process, or DDP (whose wrapper is `model`)."""

    checkpoint_format = "full"

    def check_resumable(self, layout: dict) -> None:
        if layout["backend"] not in ("none", "ddp"):
            _refuse(layout, "resume it with that backend (none and ddp share a format)")

    def full_tensors(self, pieces: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: piece.detach() for name, piece in pieces.items()}

    def load_full(self, pieces: dict[str, Tensor], full: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, piece in pieces.items():
                piece.copy_(full[name])


class FSDPEngine(TorchEngine):
    """FSDP2: parameters, gradients and optimizer state are DTensor shards; checkpoints are
    sharded through torch.distributed.checkpoint, which reshards on load."""

    checkpoint_format = "sharded"

    def check_resumable(self, layout: dict) -> None:
        if layout["backend"] != "fsdp":
            _refuse(layout, "parallel.backend=fsdp resumes only FSDP checkpoints")

    def full_tensors(self, pieces: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: piece.detach().full_tensor() for name, piece in pieces.items()}

    def load_full(self, pieces: dict[str, Tensor], full: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, piece in pieces.items():
                value = full[name].to(piece.device, piece.dtype)
                piece.copy_(distribute_tensor(value, piece.device_mesh, piece.placements))


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1-3. DeepSpeed counts micro-batches itself: its step, called after every
    micro-batch's backward, reduces, clips and applies the update on the step's last one, so
    `finish_step()` only reports the norm and clears the gradients. Its checkpoint is DeepSpeed's
    own files, written and read by the engine `ds`."""

    checkpoint_format = "deepspeed"

    def __init__(self, ds_engine, stage: int):
        self.model = self.ds = ds_engine
        self.stage = stage

    def micro_step(self, loss: Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer already normalised the loss
        self.ds.step()

    def finish_step(self) -> float:
        # DeepSpeed already skipped the update (and the schedule) if the norm was NaN/Inf.
        norm = self.ds.get_global_grad_norm()
        self.ds.optimizer.zero_grad()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def local_params(self) -> dict[str, Tensor]:
        params = self.ds.module.named_parameters()
        if self.stage == 3:  # each rank holds a flat, padded partition of every parameter
            return {n: p.ds_tensor for n, p in params if p.requires_grad}
        return {n: p for n, p in params if p.requires_grad}

    def full_tensors(self, pieces: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.stage != 3:
            return {name: piece.detach() for name, piece in pieces.items()}
        params = dict(self.ds.module.named_parameters())
        full = {}
        for name, piece in pieces.items():
            parts = [torch.empty_like(piece) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, piece.detach().contiguous())
            param = params[name]
            full[name] = torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
        return full

    def load_full(self, pieces: dict[str, Tensor], full: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, piece in pieces.items():
                value = full[name].to(piece.device, piece.dtype).flatten()
                if self.stage == 3:  # this rank's slice of the flat, zero-padded tensor
                    size = piece.numel()
                    value = torch.nn.functional.pad(value, (0, size * dist.get_world_size()))
                    value = value[dist.get_rank() * size : (dist.get_rank() + 1) * size]
                piece.copy_(value.view_as(piece))

    def check_resumable(self, layout: dict) -> None:
        backend = f"zero{self.stage}"
        if layout["backend"] != backend:
            _refuse(layout, f"parallel.backend={backend} resumes only its own checkpoints")
        if layout["dp_size"] != dist.get_world_size():
            _refuse(
                layout,
                f"ZeRO's optimizer partitions are tied to {layout['dp_size']} data-parallel "
                f"ranks, not {dist.get_world_size()}. Convert it with DeepSpeed's "
                "ds_to_universal.py and load the universal checkpoint, or resume on "
                f"{layout['dp_size']} ranks",
            )

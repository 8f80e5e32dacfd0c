"""The engines behind the trainer's one interface, whatever the backend:

    engine.model                 what the forward pass is called on
    engine.backward(loss)        accumulate gradients of one micro-batch
    engine.step() -> grad norm   reduce, clip, apply and clear the gradients (once per step);
                                 with a NaN/Inf gradient norm nothing is applied
    engine.lr                    the learning rate of the step just taken
    engine.local_params()        this rank's piece of every trainable parameter, by name
    engine.full_tensors(pieces)  the full tensors of such pieces (collective)
    engine.load_full(pieces, full)  copy full tensors into such pieces
    engine.save(dir) / load(dir) checkpoint state (collective)
    engine.check_resumable(layout, dir)  refuse, clearly, a checkpoint it cannot read

`LocalEngine` serves one process and DDP (full parameters everywhere), `FSDPEngine` FSDP2
(DTensor shards), `DeepSpeedEngine` ZeRO stages 1-3. Gradients are averaged over every rank;
the trainer scales each rank's loss so that this average is the global batch's mean.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from train.checkpoint import CheckpointError, load_tensors, load_torch, save_tensors
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


def has_frozen_params(module: nn.Module) -> bool:
    """A partly frozen model (LoRA): its checkpoints hold only what trains; the frozen weights
    come from the pretrained model it was built from."""
    return any(not p.requires_grad for p in module.parameters())


def checkpointed_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict without its frozen parameters."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    return {name: value for name, value in module.state_dict().items() if name not in frozen}


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class TorchEngine:
    """A torch optimizer and LR schedule over `module`, whose forward runs through `model`."""

    def __init__(self, model: nn.Module, module: nn.Module, cfg: OptimConfig, total_steps: int):
        self.model, self.module, self.cfg = model, module, cfg
        self.optimizer = build_optimizer(cfg, module)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, total_steps)
        )

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float:
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


def _refuse(path: Path, layout: dict, reason: str) -> None:
    raise ValueError(
        f"checkpoint {path} was written by parallel.backend={layout['backend']} on "
        f"{layout.get('world_size', 1)} ranks; {reason}"
    )


class LocalEngine(TorchEngine):
    """Full parameters on every rank: one process, or DDP (whose wrapper is `model`)."""

    def check_resumable(self, layout: dict, path: Path) -> None:
        if layout["backend"] not in ("none", "ddp"):
            _refuse(path, layout, "resume it with that backend (none and ddp share a format)")

    def full_tensors(self, pieces: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: piece.detach() for name, piece in pieces.items()}

    def load_full(self, pieces: dict[str, Tensor], full: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, piece in pieces.items():
                piece.copy_(full[name])

    def save(self, folder: Path) -> None:
        if _is_main():
            save_tensors(checkpointed_state(self.module), folder / "model.safetensors")
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                folder / "optimizer.pt",
            )

    def load(self, folder: Path) -> None:
        # Read every file before changing anything, so a corrupt file leaves no half-load.
        weights = load_tensors(folder / "model.safetensors")
        state = load_torch(folder / "optimizer.pt")
        if has_frozen_params(self.module):  # the checkpoint holds exactly what trains
            strayed = weights.keys() ^ checkpointed_state(self.module).keys()
            if strayed:
                raise RuntimeError(f"{folder / 'model.safetensors'}: mismatched keys {strayed}")
        self.module.load_state_dict(weights, strict=not has_frozen_params(self.module))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: admit only the checkpoint's own record types."""

    SAFE = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (
            module.startswith("torch.distributed.checkpoint.")
            or is_dtype
            or (module, name) in self.SAFE
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    """Reads DCP checkpoints without unpickling arbitrary objects (tensors already load with
    weights_only=True; this restricts the metadata file too)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class FSDPEngine(TorchEngine):
    """FSDP2: parameters, gradients and optimizer state are DTensor shards; checkpoints are
    sharded through torch.distributed.checkpoint, which reshards on load."""

    def check_resumable(self, layout: dict, path: Path) -> None:
        if layout["backend"] != "fsdp":
            _refuse(path, layout, "parallel.backend=fsdp resumes only FSDP checkpoints")

    def full_tensors(self, pieces: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: piece.detach().full_tensor() for name, piece in pieces.items()}

    def load_full(self, pieces: dict[str, Tensor], full: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, piece in pieces.items():
                value = full[name].to(piece.device, piece.dtype)
                piece.copy_(distribute_tensor(value, piece.device_mesh, piece.placements))

    def _state_options(self) -> StateDictOptions:
        frozen = has_frozen_params(self.module)
        return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)

    def save(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(
            self.module, self.optimizer, options=self._state_options()
        )
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder / "dcp")
        if _is_main():
            (folder / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))

    def load(self, folder: Path) -> None:
        if not (folder / "dcp" / ".metadata").exists():
            raise CheckpointError(f"checkpoint file {folder / 'dcp' / '.metadata'} is missing")
        options = self._state_options()
        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=options)
        state = {"model": model_state, "optimizer": optim_state}
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(folder / "dcp"))
            scheduler = json.loads((folder / "scheduler.json").read_text())
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as error:
            raise CheckpointError(f"cannot read checkpoint {folder / 'dcp'}: {error}") from error
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )
        self.scheduler.load_state_dict(scheduler)


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1-3. Its own gradient accumulation counts micro-batches: the update is
    applied inside the last micro-batch's step call, so `step()` only reports the norm."""

    def __init__(self, ds_engine, stage: int):
        self.model = self.ds = ds_engine
        self.stage = stage

    def backward(self, loss: Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer already normalised the loss
        self.ds.step()

    def step(self) -> float:
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

    def check_resumable(self, layout: dict, path: Path) -> None:
        backend = f"zero{self.stage}"
        if layout["backend"] != backend:
            _refuse(path, layout, f"parallel.backend={backend} resumes only its own checkpoints")
        if layout["dp_size"] != dist.get_world_size():
            _refuse(
                path,
                layout,
                f"ZeRO's optimizer partitions are tied to {layout['dp_size']} data-parallel "
                f"ranks, not {dist.get_world_size()}. Convert it with DeepSpeed's "
                "ds_to_universal.py and load the universal checkpoint, or resume on "
                f"{layout['dp_size']} ranks",
            )

    def save(self, folder: Path) -> None:
        self.ds.save_checkpoint(
            str(folder),
            tag="deepspeed",
            save_latest=False,
            exclude_frozen_parameters=has_frozen_params(self.ds.module),
        )

    def load(self, folder: Path) -> None:
        if not (folder / "deepspeed").is_dir():
            raise CheckpointError(f"checkpoint folder {folder / 'deepspeed'} is missing")
        path, _ = self.ds.load_checkpoint(
            str(folder), tag="deepspeed", load_module_strict=not has_frozen_params(self.ds.module)
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {folder}")

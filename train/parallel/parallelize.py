"""Parallelism applied to an unmodified model as plain function calls, in this order:

1. sequence and context parallelism (hooks that split tokens over the cp x sp ranks),
2. activation checkpointing per block (in place: parameter names do not change),
3. torch.compile per block (train/compile.py: CUDA only),
4. data parallelism: FSDP2 `fully_shard` per block and at the root, or DDP.

Sharding comes last because it must see the final blocks; ZeRO engines are built by DeepSpeed
itself (engines.py) on the model that steps 1-3 produced.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel

from model.pretrained import PretrainedVideoModel
from train.compile import compile_blocks
from train.config import ParallelConfig
from train.parallel.dims import ParallelDims
from train.parallel.sequence import (
    apply_pretrained_sequence_parallel,
    apply_sequence_parallel,
    sequence_attention,
)
from train.torch_private import checkpoint_activations, flatten_mesh

CP_SP = ("cp", "sp")  # the mesh dimensions a sample's tokens split over


def parallelize(
    model: nn.Module, cfg: ParallelConfig, dims: ParallelDims, param_dtype: torch.dtype | None
) -> nn.Module:
    """Apply every configured parallelism to the DiT; returns what forward is called on."""
    if dims.sequence_size > 1:
        split_sequences(model, dims)
    if cfg.activation_checkpointing != "none":
        every = 1 if cfg.activation_checkpointing == "full" else cfg.checkpoint_every_k
        apply_activation_checkpointing(model, every)
    if cfg.compile:
        compile_blocks(model.blocks, next(model.parameters()).device)
    if dims.backend == "fsdp":
        apply_fsdp(
            model, data_parallel_mesh(dims), param_dtype, cfg.reshard_after_forward, cfg.cpu_offload
        )
    elif dims.backend == "ddp":
        return DistributedDataParallel(model)
    return model


def split_sequences(model: nn.Module, dims: ParallelDims) -> None:
    """Split every sample's tokens over its sequence group: Ulysses within sp, a ring across cp."""
    mesh = dims.mesh
    groups = {name: mesh[name].get_group() if getattr(dims, name) > 1 else None for name in CP_SP}
    attend = sequence_attention(groups["sp"], groups["cp"])
    if dims.cp > 1 and dims.sp > 1:
        tokens_group = flatten_mesh(mesh[CP_SP], "cp_sp").get_group()
    else:
        tokens_group = groups["cp"] or groups["sp"]
    split = (
        apply_pretrained_sequence_parallel
        if isinstance(model, PretrainedVideoModel)
        else apply_sequence_parallel
    )
    split(model, tokens_group, attend)


def apply_activation_checkpointing(model: nn.Module, every: int) -> None:
    """Recompute every `every`-th block's activations in the backward pass."""
    if every < 1:
        raise ValueError(f"parallel.checkpoint_every_k={every} must be at least 1")
    for index, block in enumerate(model.blocks):
        if index % every == 0:
            checkpoint_activations(block)


def data_parallel_mesh(dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP shards over: cp and sp ranks hold shards too (they all need every gradient),
    and a dp_replicate dimension > 1 makes it hybrid (shard within, replicate across)."""
    mesh = dims.mesh
    shard_dim = "dp_shard"
    if dims.sequence_size > 1:
        shard_dim = "dp_shard_cp_sp"
        flatten_mesh(mesh[("dp_shard", *CP_SP)], shard_dim)
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", shard_dim]
    return mesh[shard_dim]


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    reshard: bool,
    cpu_offload: bool = False,
) -> None:
    """FSDP2: one shard unit per block plus the root (embeddings and final layer). With a low
    precision dtype, parameters and compute use it while gradients are reduced in fp32. With
    cpu_offload, sharded parameters, gradients and the optimizer state live in host memory and
    the optimizer steps there; only gathered blocks and activations take GPU memory."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Pinned host memory speeds the copies to a GPU; without one there is nothing to pin.
    pin = mesh.device_type == "cuda"
    offload = CPUOffloadPolicy(pin_memory=pin) if cpu_offload else OffloadPolicy()
    for index, block in enumerate(model.blocks):
        # The last block's parameters are needed again at once by the backward: keep them.
        last = index == len(model.blocks) - 1
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=reshard and not last,
            offload_policy=offload,
        )
    fully_shard(
        model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard, offload_policy=offload
    )

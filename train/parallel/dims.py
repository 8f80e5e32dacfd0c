"""The one object that owns the device mesh: how many ranks replicate, shard and split sequences.

The mesh has four dimensions, outermost first: `dp_replicate` (HSDP replicas, usually across
nodes), `dp_shard` (FSDP / ZeRO shard group), `cp` (context parallelism: ring attention) and `sp`
(Ulysses sequence parallelism, innermost so that its all-to-alls stay on fast intra-node links;
the ring's point-to-point sends tolerate slower ones). A sample's tokens split over the cp x sp
ranks of its sequence group (as in USP: heads all-to-all inside an sp group, a ring across sp
groups). The data-parallel rank is a rank's position over (dp_replicate, dp_shard): every rank
of a sequence group reads the same batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.config import ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "sp")


@dataclass
class ParallelDims:
    backend: str  # ddp and zero* count their data-parallel ranks in dp_shard
    dp_replicate: int
    dp_shard: int
    cp: int
    sp: int
    world_size: int
    rank: int = 0
    mesh: DeviceMesh | None = None

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int, rank: int = 0) -> ParallelDims:
        """Degrees with the -1 inferred, checked against the world size and the backend."""
        degrees = {name: getattr(cfg, name) for name in MESH_DIMS}
        if cfg.backend != "fsdp" and cfg.dp_replicate != 1:
            raise ValueError(
                f"parallel.dp_replicate={cfg.dp_replicate} (hybrid sharding) needs "
                f"parallel.backend=fsdp; {cfg.backend} counts its data-parallel ranks in "
                "parallel.dp_shard"
            )
        degrees = _infer(degrees, world_size)
        dims = cls(cfg.backend, **degrees, world_size=world_size, rank=rank)
        dims.check(cfg)
        return dims

    def check(self, cfg: ParallelConfig) -> None:
        if self.backend == "none" and self.world_size > 1:
            raise ValueError(
                f"parallel.backend=none trains in one process, but WORLD_SIZE={self.world_size}: "
                "choose parallel=ddp, fsdp, zero1, zero2 or zero3"
            )
        for name in ("cp", "sp"):
            if getattr(self, name) > 1 and self.backend.startswith("zero"):
                raise ValueError(
                    f"parallel.{name}={getattr(self, name)} is not supported with "
                    f"parallel.backend={self.backend}: sequence and context parallelism run "
                    "with ddp or fsdp"
                )
        if cfg.zero_offload != "none" and not self.backend.startswith("zero"):
            raise ValueError(
                f"parallel.zero_offload={cfg.zero_offload} needs a ZeRO backend, "
                f"not parallel.backend={self.backend}"
            )
        if cfg.zero_offload == "params" and self.backend != "zero3":
            raise ValueError(
                f"parallel.zero_offload=params needs parameter partitioning (zero3); "
                f"parallel.backend={self.backend} keeps full parameters on every rank"
            )
        if cfg.cpu_offload and self.backend != "fsdp":
            raise ValueError(
                f"parallel.cpu_offload=true is FSDP's offload, not parallel.backend={self.backend}'s"
                " (ZeRO: parallel.zero_offload=optimizer)"
            )
        if cfg.deepspeed_config and not self.backend.startswith("zero"):
            raise ValueError(
                f"parallel.deepspeed_config={cfg.deepspeed_config} is only read by the ZeRO "
                f"backends, not parallel.backend={self.backend}"
            )

    def check_model(self, num_heads: int) -> None:
        if num_heads % self.sp:
            raise ValueError(
                f"parallel.sp={self.sp} must divide the DiT's {num_heads} attention heads "
                "(Ulysses gives each sequence-parallel rank whole heads)"
            )

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def check_sequence(self, tokens: int, what: str) -> None:
        """A sequence of `tokens` tokens must split into cp x sp equal chunks of at least one."""
        if tokens < self.sequence_size or tokens % self.sequence_size:
            raise ValueError(
                f"{what} holds {tokens} tokens, which do not split into parallel.cp={self.cp} x "
                f"parallel.sp={self.sp} = {self.sequence_size} equal chunks of at least one token"
            )

    @property
    def sequence_size(self) -> int:
        """The ranks one sample's tokens are split over."""
        return self.cp * self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sequence_size

    @property
    def sequence_rank(self) -> int:
        """Which chunk of a sample's tokens this rank holds."""
        return self.rank % self.sequence_size

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The (dp_replicate, dp_shard, cp, sp) mesh; None for a single process without a group."""
        if dist.is_initialized():
            shape = tuple(getattr(self, name) for name in MESH_DIMS)
            self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        return self.mesh

    def sum_over_dp(self, values: list[float]) -> list[float]:
        """Sum per-rank values over the data-parallel ranks (a sequence group counts once)."""
        if self.world_size == 1:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(totals)
        return (totals / self.sequence_size).tolist()

    def layout(self) -> dict:
        """What a checkpoint records of how it was sharded."""
        return {"backend": self.backend, "world_size": self.world_size, "dp_size": self.dp_size}

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def describe(self) -> str:
        return (
            f"{self.backend}: world {self.world_size} = dp_replicate {self.dp_replicate} x "
            f"dp_shard {self.dp_shard} x cp {self.cp} x sp {self.sp}"
        )


def _infer(degrees: dict[str, int], world_size: int) -> dict[str, int]:
    unknown = [name for name, value in degrees.items() if value == -1]
    bad = [name for name, value in degrees.items() if value == 0 or value < -1]
    if bad or len(unknown) > 1:
        raise ValueError(
            f"parallel degrees {degrees}: each must be a positive int, at most one -1 (inferred)"
        )
    known = 1
    for value in degrees.values():
        known *= value if value > 0 else 1
    if unknown:
        if world_size % known:
            raise ValueError(
                f"parallel degrees {degrees}: the world size {world_size} is not divisible by "
                f"the product {known} of the given degrees, so parallel.{unknown[0]} cannot be "
                "inferred"
            )
        degrees = {**degrees, unknown[0]: world_size // known}
    product = math.prod(degrees.values())
    if product != world_size:
        named = " x ".join(f"{name} {value}" for name, value in degrees.items())
        raise ValueError(
            f"parallel degrees {named} = {product} must equal the world size {world_size}"
        )
    return degrees

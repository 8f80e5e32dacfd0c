"""Where a process runs: its rank, device, precision and random state.

One code path for one process and for many: a single-process run is a world of size one,
and the process group is created only when torchrun (or SLURM) says there are more.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from train.torch_private import torchelastic_agent_store


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda was asked for, but no CUDA device is available")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and bf16_ok:
        return torch.bfloat16
    return None


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def init_runtime(
    device: str = "auto", precision: str = "auto", distributed: bool = False
) -> Runtime:
    """This process's place in the run. A process group is created when torchrun/SLURM start
    several ranks, or when a distributed backend runs alone (a world of size one)."""
    rank, world_size, local_rank = launch_env()
    torch_device = _pick_device(device, local_rank)
    if (world_size > 1 or distributed) and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        # A lone rank needs no rendezvous: an in-process store will do.
        store = (
            {"store": dist.HashStore(), "rank": 0, "world_size": 1}
            if world_size == 1
            else _attempt_store(rank, world_size)
        )
        dist.init_process_group(
            backend, device_id=torch_device if backend == "nccl" else None, **store
        )
    return Runtime(
        rank, world_size, local_rank, torch_device, _pick_autocast(precision, torch_device)
    )


def _attempt_store(rank: int, world_size: int) -> dict:
    """init_process_group's store: the torchrun agent's, under a prefix per restart attempt.

    The agent keeps one store across the restarts of its workers (static and c10d rendezvous
    alike), and torch does not prefix it per attempt, so a restarted rank can read a dead
    peer's gloo or NCCL address and fail to connect. The workers of one agent share its restart
    count, so on a single node the count is a safe prefix; across nodes the agents' counts can
    differ, and there the default (env://) store is left as it is. {} means the default."""
    env = os.environ
    agent_store = torchelastic_agent_store() if env.get("GROUP_WORLD_SIZE") == "1" else None
    if agent_store is None:
        return {}
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"tessera/attempt_{attempt}", agent_store)
    return {"store": store, "rank": rank, "world_size": world_size}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def end_finished_rank() -> None:
    """End a torchrun rank whose work has returned, past interpreter finalization. Its gloo
    process groups stay alive from C++ after `shutdown` until the process ends, and their teardown
    during finalization can abort a rank that has finished (SIGABRT, "terminate called without an
    active exception": seen once, on a 4-rank worker after every rank had written its result).
    Everything that must outlive the process (the W&B run, checkpoints, results) is finished and
    flushed by then; a lone process (no torchrun) ends as usual."""
    if launch_env()[1] == 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shutdown(finished: bool = False) -> None:
    """Destroy the process group. A run that `finished` on every rank waits for all of them
    first: a rank that tears down its gloo connections while a peer's last transfer is still in
    flight aborts that peer (std::terminate in gloo's I/O thread). A failed run must not wait
    for peers that may never come."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()

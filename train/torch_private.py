"""The private torch APIs Tessera relies on, each behind one function here.

They carry no stability promise, and all were checked against torch 2.13.0. When an upgrade
moves or removes one, the call fails with a message naming the API and that version, not
with an AttributeError deep inside a run; this file is then the one place to fix.

It lives in train/ rather than train/parallel/ so that train/runtime.py and train/ema.py can use
it without importing the parallel package (and DeepSpeed with it).
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

CHECKED_AGAINST = "2.13.0"


class TorchPrivateAPIError(RuntimeError):
    """A private torch API Tessera uses is missing from the installed torch."""


def _private(owner: object, name: str, where: str):
    try:
        return getattr(owner, name)
    except AttributeError:
        raise TorchPrivateAPIError(
            f"{where}.{name} is missing from torch {torch.__version__}; Tessera uses this "
            f"private API as of torch {CHECKED_AGAINST} (train/torch_private.py)"
        ) from None


def _private_import(module: str, name: str):
    try:
        owner = importlib.import_module(module)
    except ImportError:
        raise TorchPrivateAPIError(
            f"{module} is missing from torch {torch.__version__}; Tessera uses this private "
            f"module as of torch {CHECKED_AGAINST} (train/torch_private.py)"
        ) from None
    return _private(owner, name, module)


def flatten_mesh(mesh, name: str):
    """One mesh dimension called `name` made of all the dimensions of `mesh` (a slice of a
    DeviceMesh), registered on the root mesh so that `root[name]` finds it
    (DeviceMesh._flatten)."""
    return _private(mesh, "_flatten", "DeviceMesh")(name)


def checkpoint_activations(module: nn.Module) -> None:
    """Recompute `module`'s activations in the backward pass, in place, so its parameter names
    stay as they are (torch.distributed._composable.checkpoint)."""
    _private_import("torch.distributed._composable", "checkpoint")(module)


def lerp_all_(targets: list[Tensor], sources: list[Tensor], weight: float) -> None:
    """targets[i] += weight * (sources[i] - targets[i]) in one fused call (torch._foreach_lerp_)."""
    _private(torch, "_foreach_lerp_", "torch")(targets, sources, weight)


def dcp_metadata_path(reader, rank: int | None):
    """The `.metadata` file a torch.distributed.checkpoint.FileSystemReader reads
    (FileSystemReader._get_metadata_path)."""
    return _private(reader, "_get_metadata_path", "FileSystemReader")(rank)


# Globals a DCP `.metadata` pickle refers to outside torch.distributed.checkpoint: torch writes
# torch.serialization._get_layout into it to rebuild tensor layouts.
DCP_METADATA_GLOBALS = frozenset({("torch.serialization", "_get_layout")})


def torchelastic_agent_store() -> dist.Store | None:
    """The store of the torchrun agent that started this worker, when the agent shares it with
    its workers (TORCHELASTIC_USE_AGENT_STORE, an internal of torch.distributed.elastic); None
    otherwise. It outlives the workers' restarts."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False)

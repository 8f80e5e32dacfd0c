"""What a restart needs, as components, and the stores that write them into a checkpoint folder.

A component follows torch's Stateful protocol (`state_dict()` / `load_state_dict(state)`): the
model, optimizer, LR schedule, EMA, data position, progress, each rank's random generators, and
the parallel layout (whose `load_state_dict` refuses a layout the engine cannot resume). A store
writes some components into a checkpoint folder and reads them back, in the form their values
call for:

    JsonStore        plain values, the same on every rank: rank 0 writes one JSON file
    FullTensorStore  full tensors (the EMA; a model every rank holds whole): one safetensors file
    TorchStore       tensors and plain values every rank holds whole (an optimizer): torch.save
    RankStore        one file per rank (the random generators)
    DCPStore         sharded tensors (FSDP): torch.distributed.checkpoint, which reshards on load
    DeepSpeedStore   a DeepSpeed engine's model, optimizer and schedule, in DeepSpeed's own files

Which component goes into which file is train/checkpoint.py's business (the checkpoint layout);
this module only knows how. Saving and loading are collective. Loading never unpickles code:
JSON, safetensors, torch.load(weights_only=True) (with DeepSpeed's three record types allowed),
and DCP with a restricted metadata reader and weights-only plain values.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from data.plan import DataState
from train.torch_private import DCP_METADATA_GLOBALS, dcp_metadata_path

if TYPE_CHECKING:
    from data.pipeline import Batch

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt; the message names it."""


class NotResumable(ValueError):
    """A readable checkpoint that this run's parallel layout cannot resume."""


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from error


def load_torch(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from error


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


Write = Callable[[], None]


class Background:
    """How a deferred write is prepared: `copy` takes a state into host memory of its own
    (pinned on a GPU), kept from save to save so that only the first save allocates it; the
    write's collectives go through `group`, the background writer's own (None: no group)."""

    def __init__(self, group):
        self.group = group
        cuda = torch.cuda.is_available()
        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=cuda,
            )
        )

    def copy(self, state):
        return self.stager.stage(state)


class Store(Protocol):
    """Writes its components into a checkpoint folder and restores them (both collective).

    `stage` runs on the training thread. Without `background` it writes at once; with it, it
    takes what the components hold now (the collective gathers included) into host memory
    through `background.copy`, and returns the write of that copy into the folder, which runs
    later on a background thread while training goes on."""

    def stage(self, folder: Path, background: Background | None) -> Write: ...

    def load(self, folder: Path) -> None: ...


def _written(write: Write, background: Background | None) -> Write:
    """`write` deferred to the background, or done now."""
    if background is not None:
        return write
    write()
    return _nothing


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _nothing() -> None:
    """The write of a store with nothing left to write."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class DataPosition:
    """The data component: the stream's position (seed, epoch, consumed samples) after the last
    batch the trainer drew, which is where a resumed loader starts."""

    def __init__(self, start: DataState):
        self.state = start

    def track(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            self.state = DataState.from_dict(batch.state_after)
            yield batch

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state = DataState.from_dict(state)


class RandomState:
    """This rank's generators that can influence the next step: python, numpy, torch, CUDA."""

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        _, key, pos, has_gauss, cached_gauss = np.random.get_state()
        state = {
            "python": [*internal, gauss],
            "python_version": version,
            "numpy": {
                "key": key.tolist(),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "gauss": float(cached_gauss),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate((state["python_version"], tuple(state["python"][:-1]), state["python"][-1]))
        numpy = state["numpy"]
        key = np.array(numpy["key"], dtype=np.uint32)
        np.random.set_state(("MT19937", key, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class Layout:
    """The parallel layout a checkpoint was written with; loading one the engine cannot read
    fails, naming why, before any other component changes."""

    def __init__(self, layout: dict, engine):
        self.layout, self.engine = layout, engine

    def state_dict(self) -> dict:
        return self.layout

    def load_state_dict(self, state: dict) -> None:
        self.engine.check_resumable(state)


class JsonStore:
    """Components of plain values, the same on every rank, in one JSON file that rank 0 writes;
    `record` is written beside them for readers of the checkpoint (the sampling command reads the
    config) and never loaded."""

    def __init__(self, name: str, components: dict[str, Stateful], record: dict | None = None):
        self.name, self.components, self.record = name, components, record or {}

    def stage(self, folder: Path, background: Background | None) -> Write:
        if not _is_main():
            return _nothing
        text = json.dumps({n: c.state_dict() for n, c in self.components.items()} | self.record)
        return _written(lambda: (folder / self.name).write_text(text), background)

    def load(self, folder: Path) -> None:
        path = folder / self.name
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from error
        missing = self.components.keys() - values.keys()
        if missing:
            raise CheckpointError(f"checkpoint file {path} holds no {sorted(missing)}")
        for name, component in self.components.items():
            component.load_state_dict(values[name])


class FullTensorStore:
    """One component's full tensors in a safetensors file: every rank gathers (the component's
    state_dict may be collective), rank 0 writes, every rank reads."""

    def __init__(self, name: str, component: Stateful):
        self.name, self.component = name, component

    def stage(self, folder: Path, background: Background | None) -> Write:
        tensors = self.component.state_dict()
        if not _is_main():
            return _nothing
        tensors = background.copy(tensors) if background else tensors
        return _written(lambda: save_tensors(tensors, folder / self.name), background)

    def load(self, folder: Path) -> None:
        self.component.load_state_dict(load_tensors(folder / self.name))


class TorchStore:
    """One component's tensors and plain values, held whole by every rank: rank 0 writes them
    with torch.save; they are read back with weights_only=True."""

    def __init__(self, name: str, component: Stateful):
        self.name, self.component = name, component

    def stage(self, folder: Path, background: Background | None) -> Write:
        state = self.component.state_dict()
        if not _is_main():
            return _nothing
        state = background.copy(state) if background else state
        return _written(lambda: torch.save(state, folder / self.name), background)

    def load(self, folder: Path) -> None:
        self.component.load_state_dict(load_torch(folder / self.name))


class RankStore:
    """A component every rank keeps for itself, one file per rank. A rank the checkpoint has no
    file for (it was written by fewer ranks) keeps the component as it is."""

    def __init__(self, prefix: str, component: Stateful):
        self.prefix, self.component = prefix, component

    def _path(self, folder: Path) -> Path:
        return folder / f"{self.prefix}_rank{_rank()}.pt"

    def stage(self, folder: Path, background: Background | None) -> Write:
        state, path = self.component.state_dict(), self._path(folder)
        state = background.copy(state) if background else state
        return _written(lambda: torch.save(state, path), background)

    def load(self, folder: Path) -> None:
        path = self._path(folder)
        if path.exists():
            self.component.load_state_dict(load_torch(path))
        else:
            log.info(
                "%s has no %s for rank %d: this rank keeps its own", folder, path.name, _rank()
            )


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: admit only the checkpoint's own record types."""

    SAFE = {("torch", "Size"), ("pathlib", "PosixPath"), *DCP_METADATA_GLOBALS}

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
    """Reads DCP checkpoints without unpickling arbitrary objects: the metadata file goes
    through the restricted unpickler above (tensors load with weights_only=True)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with open(dcp_metadata_path(self, kwargs.get("rank")), "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP keeps a state dict's plain values (an optimizer's hyperparameters) as pickles and
    reads them with weights_only=False. Here they are read with weights_only=True, and only the
    values that passed are handed on, re-serialised, to DCP's own loading."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


class DCPStore:
    """Components of sharded tensors (DTensors), each rank writing its shards into a folder
    through torch.distributed.checkpoint; loading reshards onto however many ranks now run."""

    def __init__(self, name: str, components: dict[str, Stateful]):
        self.name, self.components = name, components

    def stage(self, folder: Path, background: Background | None) -> Write:
        state = {name: c.state_dict() for name, c in self.components.items()}
        if background is None:
            dcp.save(state, checkpoint_id=folder / self.name)
            return _nothing
        # DCP stages the shards through the background's copies now and writes them on a thread
        # of its own, coordinating the ranks through the background's group.
        return dcp.async_save(
            state,
            checkpoint_id=folder / self.name,
            process_group=background.group,
            async_stager=background.stager,
        ).result

    def load(self, folder: Path) -> None:
        state = {name: c.state_dict() for name, c in self.components.items()}  # the shapes
        read_sharded(folder / self.name, state, one_process=False)
        for name, component in self.components.items():
            component.load_state_dict(state[name])


def read_sharded(path: Path, state: dict, one_process: bool) -> None:
    """Fill `state` (tensors or DTensors of the saved shapes, by name) from a DCP folder,
    whatever number of ranks wrote it; `one_process`: this process alone reads, into full
    tensors (sampling, export), not a collective of the ranks that now run."""
    if not (path / ".metadata").exists():
        raise CheckpointError(f"checkpoint file {path / '.metadata'} is missing")
    try:
        with warnings.catch_warnings():  # one process reading: as asked, or a world of one
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(path),
                planner=WeightsOnlyLoadPlanner(),
                no_dist=one_process,
            )
    except (
        OSError,
        ValueError,
        RuntimeError,
        pickle.UnpicklingError,
        dcp.CheckpointException,  # a BaseException: what a rank's read raised, gathered
    ) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error


def _sharded_metadata(path: Path) -> Metadata:
    try:
        return SafeFileSystemReader(path).read_metadata()
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error


def sharded_components(path: Path) -> set[str]:
    """The components a DCP folder holds (the first part of every saved name)."""
    return {name.split(".", 1)[0] for name in _sharded_metadata(path).state_dict_metadata}


def read_sharded_component(path: Path, component: str) -> dict[str, Tensor]:
    """One component's full tensors from a DCP folder, read in this process, shaped as saved."""
    prefix = f"{component}."
    saved = {
        name.removeprefix(prefix): entry
        for name, entry in _sharded_metadata(path).state_dict_metadata.items()
        if name.startswith(prefix)
    }
    if not saved:
        raise CheckpointError(f"checkpoint {path} holds no {component}")
    state = {
        component: {
            name: torch.empty(entry.size, dtype=entry.properties.dtype)
            for name, entry in saved.items()
        }
    }
    read_sharded(path, state, one_process=True)
    return state[component]


def has_frozen_params(module: nn.Module) -> bool:
    """A partly frozen model (LoRA): its checkpoints hold only what trains; the frozen weights
    come from the pretrained model it was built from."""
    return any(not p.requires_grad for p in module.parameters())


def _state_options(module: nn.Module) -> StateDictOptions:
    frozen = has_frozen_params(module)
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


class ModelState:
    """The model component: its state by name (full tensors, or DTensor shards under FSDP),
    without the frozen weights of a partly frozen model."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, Tensor]:
        return get_model_state_dict(self.module, options=_state_options(self.module))

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        strayed = state.keys() ^ self.state_dict().keys()
        if strayed:  # what trains, exactly: a LoRA checkpoint must not miss an adapter
            raise CheckpointError(f"the checkpoint's model has mismatched keys {sorted(strayed)}")
        set_model_state_dict(self.module, state, options=_state_options(self.module))


class OptimizerState:
    """The optimizer component, keyed by parameter name so it can be resharded."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(
            self.module, self.optimizer, options=_state_options(self.module)
        )

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(
            self.module, self.optimizer, state, options=_state_options(self.module)
        )


class DeepSpeedStore:
    """The model, optimizer and LR schedule of a DeepSpeed engine, in the files DeepSpeed
    writes itself under the folder `tag` (its ZeRO partitions can only be resumed by the same
    number of ranks; `read_zero_weights` consolidates their weights in one process)."""

    def __init__(self, ds_engine, tag: str):
        self.ds, self.tag = ds_engine, tag

    def stage(self, folder: Path, background: Background | None) -> Write:
        """Written at once: the engine's files are DeepSpeed's to write (the config refuses
        asynchronous checkpoints with ZeRO)."""
        self.save(folder)
        return _nothing

    def save(self, folder: Path) -> None:
        self.ds.save_checkpoint(
            str(folder),
            tag=self.tag,
            save_latest=True,  # its `latest`: the zero_to_fp32.py copied beside it reads it
            exclude_frozen_parameters=has_frozen_params(self.ds.module),
        )

    def load(self, folder: Path) -> None:
        if not (folder / self.tag).is_dir():
            raise CheckpointError(f"checkpoint folder {folder / self.tag} is missing")
        path, _ = self.ds.load_checkpoint(
            str(folder), tag=self.tag, load_module_strict=not has_frozen_params(self.ds.module)
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {folder}")


def deepspeed_records() -> list[type]:
    """What DeepSpeed's checkpoint files hold besides tensors and plain containers: the only
    types unpickled from them."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def read_zero_weights(folder: Path, tag: str) -> dict[str, Tensor]:
    """The fp32 weights of a ZeRO checkpoint, consolidated in this process from every rank's
    partitions by DeepSpeed's own zero_to_fp32, which reads its files weights-only here."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (folder / tag).is_dir():
        raise CheckpointError(f"checkpoint folder {folder / tag} is missing")
    try:
        with torch.serialization.safe_globals(deepspeed_records()), _weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"cannot read the ZeRO checkpoint {folder / tag}: {error}") from error


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """torch.load is weights-only inside, even where a library asks it not to be."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before

"""What a restart needs, as components, and the stores that write them into a checkpoint.

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

The engine supplies the stores of what it alone holds (`engine.checkpoint_stores()`); DeepSpeed's,
which writes the files DeepSpeed forces, lives beside its engine. Saving and loading are
collective; the Checkpointer (train/checkpoint.py) calls every store, in order, through one path.
Loading never unpickles code: JSON, safetensors, torch.load(weights_only=True), and DCP with a
restricted metadata reader and weights-only plain values.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from data.plan import DataState
from train.checkpoint import CheckpointError, load_tensors, load_torch, save_tensors
from train.torch_private import DCP_METADATA_GLOBALS, dcp_metadata_path

if TYPE_CHECKING:
    from data.pipeline import Batch

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Store(Protocol):
    """Writes its components into a checkpoint folder and restores them (both collective)."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


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

    def save(self, folder: Path) -> None:
        if _is_main():
            values = {name: c.state_dict() for name, c in self.components.items()}
            (folder / self.name).write_text(json.dumps(values | self.record, indent=2))

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

    def save(self, folder: Path) -> None:
        tensors = self.component.state_dict()
        if _is_main():
            save_tensors(tensors, folder / self.name)

    def load(self, folder: Path) -> None:
        self.component.load_state_dict(load_tensors(folder / self.name))


class TorchStore:
    """One component's tensors and plain values, held whole by every rank: rank 0 writes them
    with torch.save; they are read back with weights_only=True."""

    def __init__(self, name: str, component: Stateful):
        self.name, self.component = name, component

    def save(self, folder: Path) -> None:
        state = self.component.state_dict()
        if _is_main():
            torch.save(state, folder / self.name)

    def load(self, folder: Path) -> None:
        self.component.load_state_dict(load_torch(folder / self.name))


class RankStore:
    """A component every rank keeps for itself, one file per rank. A rank the checkpoint has no
    file for (it was written by fewer ranks) keeps the component as it is."""

    def __init__(self, prefix: str, component: Stateful):
        self.prefix, self.component = prefix, component

    def _path(self, folder: Path) -> Path:
        return folder / f"{self.prefix}_rank{_rank()}.pt"

    def save(self, folder: Path) -> None:
        torch.save(self.component.state_dict(), self._path(folder))

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

    def save(self, folder: Path) -> None:
        state = {name: c.state_dict() for name, c in self.components.items()}
        dcp.save(state, checkpoint_id=folder / self.name)

    def load(self, folder: Path) -> None:
        path = folder / self.name
        if not (path / ".metadata").exists():
            raise CheckpointError(f"checkpoint file {path / '.metadata'} is missing")
        state = {name: c.state_dict() for name, c in self.components.items()}  # the shapes
        try:
            dcp.load(
                state, storage_reader=SafeFileSystemReader(path), planner=WeightsOnlyLoadPlanner()
            )
        except (
            OSError,
            ValueError,
            RuntimeError,
            pickle.UnpicklingError,
            dcp.CheckpointException,  # a BaseException: what a rank's read raised, gathered
        ) as error:
            raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
        for name, component in self.components.items():
            component.load_state_dict(state[name])


def checkpoint_stores(engine, ema, progress, data, layout: dict, config: dict) -> list[Store]:
    """Every component of a training checkpoint, in the order they are saved and loaded: the
    layout first (a checkpoint the engine cannot read fails before anything changes), each
    rank's random generators last."""
    replicated = {"layout": Layout(layout, engine), "progress": progress, "data": data}
    return [
        JsonStore("trainer.json", replicated, record={"config": config}),
        *engine.checkpoint_stores(),
        *([FullTensorStore("ema.safetensors", ema)] if ema is not None else []),
        RankStore("rng", RandomState()),
    ]

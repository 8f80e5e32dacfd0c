"""The checkpoint layout: which file holds what, how a checkpoint is committed, and how a trained
model's weights are read back. No other module names these files.

    <run_dir>/checkpoints/step_XXXXXXXX/   one committed checkpoint:
        trainer.json        progress, data position, parallel layout (with the engine's
                            checkpoint format), and the run's config for readers
        lr_schedule.json    }
        model.safetensors   } format "full" (one process, DDP): full tensors
        optimizer.pt        }
        dcp/                format "sharded" (FSDP): model, optimizer and EMA, with lr_schedule.json
        deepspeed/          format "deepspeed" (ZeRO 1-3): DeepSpeed's own files
        ema.safetensors     formats "full" and "deepspeed": the EMA's full weights
        rng_rank<r>.pt      each rank's random generators
        manifest.json       every file's size, written last
    <run_dir>/checkpoints/latest            the newest committed checkpoint's folder name
    <run_dir>/export/model.safetensors      the final consolidated weights (the EMA's if any)
    <run_dir>/export/config.json            the run's config, with "weights": "ema" | "raw"

Writing: a checkpoint folder is written under a temporary name and renamed once every rank's
files are on disk and listed with their sizes in `manifest.json`; `latest` is rewritten
(atomically) only after that. A crash at any moment leaves the previous checkpoint as the latest
complete one; so does a crash while an asynchronous save writes in the background. What goes
into the folder is the training state's components, each written by its store (train/state.py).

Reading weights back (`find_weights`, then `read_weights`): raw or EMA weights of a run
directory, an export folder or any engine's checkpoint folder, consolidated in one process
(sharded ones resharded by DCP, ZeRO partitions merged by DeepSpeed's zero_to_fp32), for
sampling, evaluation and export.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data.storage import atomic_path, fsync, write_atomic
from train.ema import EMAShards
from train.state import (
    Background,
    CheckpointError,
    DCPStore,
    DeepSpeedStore,
    FullTensorStore,
    JsonStore,
    Layout,
    ModelState,
    NotResumable,
    RandomState,
    RankStore,
    Store,
    TorchStore,
    load_tensors,
    read_sharded,
    read_sharded_component,
    read_zero_weights,
    save_tensors,
    sharded_components,
)

log = logging.getLogger(__name__)

CHECKPOINTS, LATEST, EXPORT = "checkpoints", "latest", "export"
STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
TRAINER = "trainer.json"
LR_SCHEDULE = "lr_schedule.json"
MODEL = "model.safetensors"  # full weights: format "full", and an export
OPTIMIZER = "optimizer.pt"
SHARDED = "dcp"
DEEPSPEED = "deepspeed"
EMA = "ema.safetensors"
SHARDED_EMA = "ema"  # the EMA's component in dcp/
RNG = "rng"
EXPORT_CONFIG = "config.json"
WEIGHTS = ("ema", "raw")


# --- what a checkpoint holds -----------------------------------------------------------------


def checkpoint_stores(engine, ema, progress, data, layout: dict, config: dict) -> list[Store]:
    """Every component of a training checkpoint, in the order they are saved and loaded: the
    layout first (a checkpoint the engine cannot read fails before anything changes), each
    rank's random generators last."""
    layout = layout | {"format": engine.checkpoint_format}
    replicated = {"layout": Layout(layout, engine), "progress": progress, "data": data}
    return [
        JsonStore(TRAINER, replicated, record={"config": config}),
        *_engine_stores(engine, ema),
        RankStore(RNG, RandomState()),
    ]


def _engine_stores(engine, ema) -> list[Store]:
    """What only the engine holds (model, optimizer, LR schedule) and the EMA, in the engine's
    checkpoint format. A sharded EMA stays sharded: gathering it would put the whole average
    on one rank, and stall an asynchronous save for the gather."""
    full_ema = [FullTensorStore(EMA, ema)] if ema is not None else []
    if engine.checkpoint_format == "deepspeed":
        return [DeepSpeedStore(engine.ds, DEEPSPEED), *full_ema]
    schedule = JsonStore(LR_SCHEDULE, {"lr_schedule": engine.scheduler})
    if engine.checkpoint_format == "sharded":
        components = {"model": engine.model_state, "optimizer": engine.optimizer_state}
        if ema is not None:
            components[SHARDED_EMA] = EMAShards(ema)
        return [schedule, DCPStore(SHARDED, components)]
    return [
        schedule,
        FullTensorStore(MODEL, engine.model_state),
        TorchStore(OPTIMIZER, engine.optimizer_state),
        *full_ema,
    ]


# --- committing and finding checkpoints ------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from error


def _write_manifest(folder: Path) -> None:
    """Record every file's size (after fsyncing it), so truncation is caught on load."""
    sizes = {}
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            fsync(file)
            sizes[str(file.relative_to(folder))] = file.stat().st_size
    write_atomic(folder / MANIFEST, json.dumps(sizes, indent=1), durable=True)


def _verify_manifest(folder: Path) -> None:
    sizes = _read_json(folder / MANIFEST)
    for name, size in sizes.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {file} has {file.stat().st_size} bytes, {size} were written"
            )


def fault_point(name: str, step: int) -> None:
    """Crash here when TESSERA_FAULT=<name>@<step> is set: how tests kill a run at an exact
    point (e.g. halfway through writing a checkpoint). Does nothing otherwise."""
    if os.environ.get("TESSERA_FAULT") == f"{name}@{step}":
        log.error("TESSERA_FAULT=%s@%d: killing this process", name, step)
        os.kill(os.getpid(), signal.SIGKILL)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group)


class Checkpointer:
    """Owns `<run_dir>/checkpoints/`: which checkpoints exist, and how they are written.

    A checkpoint holds the training state as components (train/state.py), each written by its
    store: the stores are called in order, by every rank, for saving and for loading alike.

    Asynchronous saves (`asynchronous`): the step stops only while the stores copy the state
    into host memory (the copies are kept from save to save); a background thread writes it,
    waits for every rank's writes (through a gloo group of its own, so it never meets the
    training's collectives), and only then commits. One save is in flight at most: the next,
    and `wait`, wait for it.
    """

    def __init__(
        self,
        run_dir: str | Path,
        stores: list,
        keep_last: int = 3,
        keep_every: int = 0,
        asynchronous: bool = False,
    ):
        self.root = Path(run_dir) / CHECKPOINTS
        self.stores = stores
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.asynchronous = asynchronous
        self.background = None
        if asynchronous:  # the group is made by every rank alike, as collectives are
            self.background = Background(
                dist.new_group(backend="gloo") if dist.is_initialized() else None
            )
        self._writer = ThreadPoolExecutor(1, "checkpoint") if asynchronous else None
        self._in_flight: Future | None = None

    def save(self, step: int) -> Path:
        """Checkpoint the state as it is now; asynchronous: committed in the background."""
        self.wait()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        writes = [store.stage(tmp, self.background) for store in self.stores]
        if self._writer is None:
            self._commit(writes, tmp, final, step)
        else:
            self._in_flight = self._writer.submit(self._commit, writes, tmp, final, step)
        return final

    @property
    def writing(self) -> bool:
        """Whether a save is in flight: staged, not yet committed."""
        return self._in_flight is not None and not self._in_flight.done()

    def wait(self) -> None:
        """Until the save in flight, if any, is committed (its error, if it failed)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def _commit(self, writes: list, tmp: Path, final: Path, step: int) -> None:
        for write in writes:
            write()
        fault_point("checkpoint", step)
        group = self.background.group if self.background else None
        _barrier(group)
        if _is_main():
            _write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync(self.root)
            write_atomic(self.root / LATEST, final.name, durable=True)
            self._apply_retention()
        _barrier(group)

    def complete_checkpoints(self) -> list[Path]:
        """Committed checkpoints, oldest first (temporary folders are never listed)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: p.name)

    def _apply_retention(self) -> None:
        checkpoints = self.complete_checkpoints()
        keep = set(checkpoints[-self.keep_last :]) if self.keep_last > 0 else set(checkpoints)
        for path in checkpoints:
            step = int(STEP_DIR.match(path.name).group(1))
            if path not in keep and not (self.keep_every and step % self.keep_every == 0):
                shutil.rmtree(path)

    def resume_candidates(self, resume: str) -> list[Path]:
        """Checkpoints to try, best first: an explicit folder, or (auto) newest to oldest."""
        if resume == "never":
            return []
        if resume != "auto":
            path = Path(resume)
            if not (path / TRAINER).exists():
                raise CheckpointError(f"train.resume={resume}: no checkpoint ({TRAINER}) there")
            return [path]
        return list(reversed(self.complete_checkpoints()))

    def load(self, path: Path) -> None:
        """Restore every component from `path`. Every file is checked against the manifest
        first, so a truncated or missing one fails before anything changes."""
        _verify_manifest(path)
        try:
            for store in self.stores:
                store.load(path)
        except NotResumable as error:
            raise NotResumable(f"checkpoint {path}: {error}") from None

    def load_latest(self, resume: str) -> Path | None:
        """Load the newest readable checkpoint (a corrupt one is reported and skipped); returns
        its folder, or None when there is none to resume."""
        candidates = self.resume_candidates(resume)
        for path in candidates:
            try:
                self.load(path)
                return path
            except CheckpointError as error:
                if resume != "auto":
                    raise
                log.warning("skipping unreadable checkpoint: %s", error)
        if candidates:
            raise CheckpointError(f"no readable checkpoint in {self.root}")
        return None


# --- the trained weights -----------------------------------------------------------------------


def export(run_dir: str | Path, weights: dict[str, torch.Tensor], config: dict, kind: str) -> Path:
    """Write `<run_dir>/export/`: one consolidated safetensors file (`kind`: "ema" or "raw"
    weights) and the run's config as JSON, which the sampling command and later stages load."""
    out = Path(run_dir) / EXPORT
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL) as tmp:
        save_tensors(weights, tmp)
    write_atomic(out / EXPORT_CONFIG, json.dumps({**config, "weights": kind}, indent=2))
    return out


@dataclass(frozen=True)
class SavedWeights:
    """A trained model's weights on disk: an export folder, or one checkpoint folder."""

    folder: Path
    kind: str  # "ema" | "raw": what `read_weights` gives
    format: str  # "export", or the checkpoint's: "full" | "sharded" | "deepspeed"
    config: dict  # the run's config
    progress: dict  # the training progress they were saved at (step, tokens seen...); {}: unknown

    @property
    def run_dir(self) -> Path:
        """The run directory the weights belong to (the folder itself when it is not in one)."""
        if self.folder.name == EXPORT:
            return self.folder.parent
        if self.folder.parent.name == CHECKPOINTS:
            return self.folder.parent.parent
        return self.folder


def find_weights(path: str | Path, weights: str = "ema") -> SavedWeights:
    """The `weights` ("ema" or "raw") of a run directory (its export when that holds them,
    else its latest checkpoint), an export folder, or a checkpoint folder. Where a run kept no
    EMA, its raw weights stand in for it, with a warning."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {', '.join(WEIGHTS)}")
    path = Path(path)
    if (path / EXPORT).is_dir() or (path / CHECKPOINTS).is_dir():
        return _in_run_dir(path, weights)
    if (path / EXPORT_CONFIG).exists():
        return _in_export(path, weights)
    if (path / TRAINER).exists():
        return _in_checkpoint(path, weights)
    raise CheckpointError(
        f"checkpoint={path}: not a run directory, export folder or checkpoint folder (no "
        f"{EXPORT}/, {CHECKPOINTS}/, {EXPORT_CONFIG} or {TRAINER})"
    )


def _in_run_dir(run: Path, weights: str) -> SavedWeights:
    exported = run / EXPORT / EXPORT_CONFIG
    if exported.exists() and _read_json(exported).get("weights") in (weights, "raw"):
        return _in_export(run / EXPORT, weights)  # the weights asked, or all the run kept
    latest = run / CHECKPOINTS / LATEST
    if latest.exists():
        return _in_checkpoint(run / CHECKPOINTS / latest.read_text().strip(), weights)
    if exported.exists():
        return _in_export(run / EXPORT, weights)
    raise CheckpointError(f"checkpoint={run}: the run has neither an export nor a checkpoint")


def _in_export(folder: Path, weights: str) -> SavedWeights:
    values = _read_json(folder / EXPORT_CONFIG)
    kind = values.pop("weights", "raw")
    if weights == "raw" and kind == "ema":
        raise CheckpointError(
            f"{folder} holds the EMA weights; the raw ones are in the run's checkpoints "
            f"(checkpoint=<run>/{CHECKPOINTS}/step_XXXXXXXX weights=raw)"
        )
    _warn_if_raw(folder, weights, kind)
    # A run's export is written at its end, as is its latest checkpoint: the same progress.
    latest = folder.parent / CHECKPOINTS / LATEST
    trainer = latest.parent / latest.read_text().strip() / TRAINER if latest.exists() else None
    progress = _read_json(trainer).get("progress", {}) if trainer and trainer.exists() else {}
    return SavedWeights(folder, kind, "export", values, progress)


def _in_checkpoint(folder: Path, weights: str) -> SavedWeights:
    record = _read_json(folder / TRAINER)
    layout_format = record.get("layout", {}).get("format")
    if layout_format is None:
        raise CheckpointError(
            f"{folder / TRAINER} records no checkpoint format: written by an "
            "older Tessera; sample from its export instead"
        )
    kind = "ema" if weights == "ema" and _holds_ema(folder, layout_format) else "raw"
    _warn_if_raw(folder, weights, kind)
    return SavedWeights(folder, kind, layout_format, record["config"], record.get("progress", {}))


def _holds_ema(folder: Path, layout_format: str) -> bool:
    if layout_format == "sharded":
        return SHARDED_EMA in sharded_components(folder / SHARDED)
    return (folder / EMA).exists()


def _warn_if_raw(folder: Path, weights: str, kind: str) -> None:
    if weights != kind:
        log.warning("%s holds no EMA weights (the run kept none): reading its raw weights", folder)


def read_weights(saved: SavedWeights, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The full weights `saved` names, read in this process. A sharded checkpoint needs `model`,
    built like the run's: its weights are read straight into the model's own tensors, so a large
    model is never twice in memory."""
    if saved.format == "export":
        return load_tensors(saved.folder / MODEL)
    if saved.kind == "ema" and saved.format == "sharded":
        return read_sharded_component(saved.folder / SHARDED, SHARDED_EMA)
    if saved.kind == "ema":
        return load_tensors(saved.folder / EMA)
    if saved.format == "full":
        return load_tensors(saved.folder / MODEL)
    if saved.format == "sharded":
        if model is None:
            raise ValueError(f"{saved.folder} is sharded: reading it needs the model it holds")
        state = {"model": ModelState(model).state_dict()}  # the model's tensors, by name
        read_sharded(saved.folder / SHARDED, state, one_process=True)
        return state["model"]
    if saved.format == "deepspeed":
        return read_zero_weights(saved.folder, DEEPSPEED)
    raise CheckpointError(f"{saved.folder}: unknown checkpoint format {saved.format!r}")

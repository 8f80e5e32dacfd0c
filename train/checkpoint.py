"""Checkpoints: save, load, atomic commit, a `latest` pointer, retention and export.

A checkpoint is a folder `step_XXXXXXXX/` written under a temporary name and renamed
when every file is on disk and listed with its size in `manifest.json`; `latest` is
rewritten (atomically) only after that. A crash
at any moment therefore leaves the previous checkpoint as the latest complete one.
What goes into the folder is the training state's components, each written by its store
(train/state.py); loading never unpickles code from a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt; the message names it."""


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from error


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


MANIFEST = "manifest.json"


def _write_manifest(folder: Path) -> None:
    """Record every file's size (after fsyncing it), so truncation is caught on load."""
    sizes = {}
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            sizes[str(file.relative_to(folder))] = file.stat().st_size
    _write_atomic(folder / MANIFEST, json.dumps(sizes, indent=1))


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class NotResumable(ValueError):
    """A readable checkpoint that this run's parallel layout cannot resume."""


class Checkpointer:
    """Owns `<run_dir>/checkpoints/`: which checkpoints exist, and how they are written.

    A checkpoint holds the training state as components (train/state.py), each written by its
    store: the stores are called in order, by every rank, for saving and for loading alike.
    """

    def __init__(self, run_dir: str | Path, stores: list, keep_last: int = 3, keep_every: int = 0):
        self.root = Path(run_dir) / "checkpoints"
        self.stores = stores
        self.keep_last = keep_last
        self.keep_every = keep_every

    def save(self, step: int) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        main = _is_main()
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        for store in self.stores:
            store.save(tmp)
        fault_point("checkpoint", step)
        _barrier()
        if main:
            _write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / "latest", final.name)
            self._apply_retention()
        _barrier()
        return final

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
            if not (path / "trainer.json").exists():
                raise CheckpointError(f"train.resume={resume}: no checkpoint (trainer.json) there")
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


def export(run_dir: str | Path, weights: dict[str, torch.Tensor], config: dict, kind: str) -> Path:
    """Write `<run_dir>/export/`: one consolidated safetensors file (`kind`: "ema" or "raw"
    weights) and the run's config as JSON, which the sampling command and later stages load."""
    out = Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_tensors(weights, tmp)
    os.replace(tmp, out / "model.safetensors")
    _write_atomic(out / "config.json", json.dumps({**config, "weights": kind}, indent=2))
    return out

"""Checkpoints: save, load, atomic commit, a `latest` pointer, retention and export.

A checkpoint is a folder `step_XXXXXXXX/` written under a temporary name and renamed
when every file is on disk; `latest` is rewritten (atomically) only after that. A crash
at any moment therefore leaves the previous checkpoint as the latest complete one.
Tensors are stored with safetensors, or with torch.save and read back with
`weights_only=True`: loading never unpickles code from a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt; the message names it."""


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from error


def _load_torch(path: Path) -> dict:
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


class Checkpointer:
    """Owns `<run_dir>/checkpoints/`: which checkpoints exist, and how they are written."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, keep_every: int = 0):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_every = keep_every

    def save(self, step: int, engine, ema, trainer_state: dict, rng: dict) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = engine.state_dict()
        _save_tensors(state["model"], tmp / "model.safetensors")
        torch.save(
            {"optimizer": state["optimizer"], "scheduler": state["scheduler"]}, tmp / "optimizer.pt"
        )
        if ema is not None:
            _save_tensors(ema.state_dict(), tmp / "ema.safetensors")
        torch.save(rng, tmp / "rng_rank0.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / "latest", final.name)
        self._apply_retention()
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

    def load(self, path: Path, engine, ema) -> tuple[dict, dict]:
        """Restore engine and EMA from `path`; returns (trainer_state, rng_state)."""
        # Read every file before changing anything, so a corrupt file leaves no half-load.
        trainer_state = _read_json(path / "trainer.json")
        state = {
            "model": load_tensors(path / "model.safetensors"),
            **_load_torch(path / "optimizer.pt"),
        }
        ema_state = load_tensors(path / "ema.safetensors") if ema is not None else None
        rng = _load_torch(path / "rng_rank0.pt")
        engine.load_state_dict(state)
        if ema is not None:
            ema.load_state_dict(ema_state)
        return trainer_state, rng

    def load_latest(self, resume: str, engine, ema) -> tuple[dict, dict] | None:
        """Load the newest readable checkpoint; a corrupt one is reported and skipped."""
        candidates = self.resume_candidates(resume)
        for path in candidates:
            try:
                return self.load(path, engine, ema)
            except CheckpointError as error:
                if resume != "auto":
                    raise
                log.warning("skipping unreadable checkpoint: %s", error)
        if candidates:
            raise CheckpointError(f"no readable checkpoint in {self.root}")
        return None


def export(run_dir: str | Path, model: torch.nn.Module, ema, config: dict) -> Path:
    """Write `<run_dir>/export/`: one safetensors file (EMA weights when there is an EMA) and
    the run's config as JSON, which the sampling command and later stages load."""
    out = Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict()
    if ema is not None:
        weights.update(ema.state_dict())
    tmp = out / "model.safetensors.tmp"
    _save_tensors(weights, tmp)
    os.replace(tmp, out / "model.safetensors")
    _write_atomic(
        out / "config.json", json.dumps({**config, "weights": "ema" if ema else "raw"}, indent=2)
    )
    return out

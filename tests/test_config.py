"""The typed config: every preset composes, and bad keys or types fail loudly, naming the key,
before any work starts."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from train.config import Config, register_configs, to_config

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def compose_config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))
)
def test_every_experiment_composes(experiment):
    config = compose_config(f"experiment={experiment}")
    assert isinstance(config, Config)
    assert config.train.steps >= 1


def test_misspelt_key_is_named():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("optim.lrr=1e-3")
    assert "lrr" in str(error.value) + str(error.value.__cause__)


def test_wrong_type_is_named():
    with pytest.raises(Exception) as error:
        compose_config("train.steps=many")
    assert "steps" in str(error.value) + str(error.value.__cause__)


def test_bad_choice_is_named():
    with pytest.raises(ValueError, match="train.stage='vae'"):
        compose_config("train.stage=vae")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.read_ahead=0", "data.read_ahead=0 must be at least 1"),
        ("data.read_retries=-1", "data.read_retries=-1 must be at least 0"),
        ("data.cache_mb=-5", "data.cache_mb=-5 must be at least 0"),
        ("data.max_failed_reads=0", "data.max_failed_reads=0 must be at least 1"),
    ],
)
def test_bad_reader_settings_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        compose_config(override)


@pytest.mark.slow
def test_typo_inside_a_preset_fails_before_work(tmp_path):
    """A misspelt key in a user's experiment file stops `python -m train` at once."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\ntrain:\n  stpes: 3\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config-dir",
            str(tmp_path),
            "experiment=typo",
            f"train.run_dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "stpes" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

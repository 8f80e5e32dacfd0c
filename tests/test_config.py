"""The typed config: every preset composes, and bad keys, types or values fail loudly, naming
the key, before any work starts: every numeric key declares its range, and each one set outside
it is refused."""

import dataclasses
import math
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from train.config import RANGES, Config, Range, register_configs, to_config

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


def numeric_keys(schema: type = Config, prefix: str = "") -> dict[str, type]:
    """Every int or float key of the config schema (optional ones too), and its number type."""
    keys = {}
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            keys |= numeric_keys(kind, f"{prefix}{field.name}.")
            continue
        optional = typing.get_args(kind) if type(None) in typing.get_args(kind) else ()
        numbers = [t for t in (kind, *optional) if t in (int, float)]
        if numbers:
            keys[prefix + field.name] = numbers[0]
    return keys


def test_every_numeric_key_declares_its_range():
    assert set(numeric_keys()) == set(RANGES)


def outside(allowed: str, kind: type) -> int | float | None:
    """A value just outside the interval of a RANGES entry (None: the interval has no outside)."""
    interval = allowed.split(" or ")[0]
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    step = 1 if kind is int else 0.5
    if math.isfinite(low):
        value = low if interval[0] == "(" else low - step
    elif math.isfinite(high):
        value = high if interval[-1] == ")" else high + step
    else:
        return None
    if f" or {kind(value)}" in allowed:  # a sentinel such as -1: one step further out
        value -= step
    return kind(value)


@pytest.mark.parametrize(("key", "kind"), sorted(numeric_keys().items()))
def test_a_numeric_key_outside_its_range_is_refused_naming_it(key, kind):
    value = outside(RANGES[key], kind)
    if value is None:
        pytest.skip(f"{key} takes any number ({RANGES[key]})")
    assert value not in Range(RANGES[key])
    message = f"config key {key}={value} is outside its range {re.escape(RANGES[key])}"
    with pytest.raises(ValueError, match=message):
        compose_config(f"{key}={value}")


def test_asynchronous_checkpoints_are_refused_with_zero_naming_why():
    with pytest.raises(ValueError, match="train.checkpoint_async=true cannot be used with paral"):
        compose_config("parallel=zero2", "train.checkpoint_async=true")


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

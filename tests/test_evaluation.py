"""Quality evaluation of trained runs, with tiny feature networks of the real kinds (an I3D-like
TorchScript file, a CLIP folder) built here: during training every eval.every steps, logged to
an offline W&B run, and afterwards by `python -m train.evaluate` on one or two ranks."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from launching import launch_training, metrics, run_checked, torchrun_command
from models import save_tiny_clip, save_tiny_i3d

from train.config import Config, to_config

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")

VIDEOS = 3


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("feature_models")
    return save_tiny_i3d(folder / "i3d_torchscript.pt"), save_tiny_clip(folder / "clip")


def eval_overrides(held_out: Path, feature_models: tuple[Path, Path]) -> list[str]:
    i3d, clip = feature_models
    return [
        f"eval.shards={held_out}",
        "eval.samples=4",
        "eval.timesteps=2",
        "eval.times=3",
        f"eval.videos={VIDEOS}",
        "eval.video_shape=[5,32,32]",
        "eval.sample_steps=2",
        f"eval.fvd_model={i3d}",
        f"eval.clip_model={clip}",
    ]


def training_overrides(demo_shards, autoencoder, run: Path) -> list[str]:
    """4 steps of the micro DiT, checkpointed and evaluated at steps 2 and 4."""
    return [
        f"data.shards={demo_shards}",
        f"train.run_dir={run}",
        "model=micro",
        f"autoencoder.checkpoint={autoencoder}",
        "train.steps=4",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.sample_prompts=[]",
        "eval.every=2",
        "data.num_workers=0",
    ]


@pytest.fixture(scope="module")
def trained(demo_shards, held_out, autoencoder, feature_models, tmp_path_factory) -> Path:
    """The run, logged to an offline W&B run."""
    run = tmp_path_factory.mktemp("evaluated")
    launch_training(
        *training_overrides(demo_shards, autoencoder, run),
        "logger=wandb",
        "logger.mode=offline",
        *eval_overrides(held_out, feature_models),
        nproc=1,
    )
    return run


@pytest.mark.slow
def test_training_evaluates_generated_videos_and_logs_them(trained):
    for step in (2, 4):
        result = json.loads((trained / "eval" / f"step_{step:08d}.json").read_text())
        assert result["fvd"] >= 0 and -1 <= result["clip_score"] <= 1
        assert set(result["feature_models"]) == {"fvd_model", "clip_model"}
        assert all("sha256:" in model for model in result["feature_models"].values())
        assert list(result["loss_at_time"]) == ["0.167", "0.5", "0.833"]
        grid = (trained / "eval" / f"step_{step:08d}.png").read_bytes()
        assert grid[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {line["step"]: line for line in metrics(trained) if "eval/fvd" in line}
    assert sorted(logged) == [2, 4]
    assert logged[4]["eval/fvd"] == result["fvd"] and "eval/loss_at_time/0.5" in logged[4]
    (wandb_run,) = (trained / "wandb").glob("offline-run-*")
    images = list((wandb_run / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == 2, images


@pytest.mark.multiprocess
def test_evaluate_command_repeats_the_training_evaluation_on_one_and_two_ranks(trained, tmp_path):
    """The step-4 checkpoint's raw weights are what training evaluated at step 4: the command
    gives the same numbers, on one process and on two ranks that share the set."""
    at_step_4 = json.loads((trained / "eval" / "step_00000004.json").read_text())
    command = ["-m", "train.evaluate", f"checkpoint={trained}/checkpoints/step_00000004"]
    results = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks_{ranks}"
        args = (*command, "weights=raw", f"out={out}")
        if ranks == 1:
            run_checked([sys.executable, *args])
        else:
            run_checked(torchrun_command(*args, nproc=2))
        results[ranks] = json.loads((out / "eval" / "step_00000004.json").read_text())
        assert (out / "eval" / "step_00000004.png").exists()
    for result in results.values():
        assert result["loss"] == pytest.approx(at_step_4["loss"], rel=1e-12)
        for time, values in at_step_4["loss_at_time"].items():
            assert result["loss_at_time"][time]["loss"] == pytest.approx(values["loss"], rel=1e-12)
        assert result["fvd"] == pytest.approx(at_step_4["fvd"], rel=1e-6)
        assert result["clip_score"] == pytest.approx(at_step_4["clip_score"], rel=1e-6)
        assert result["feature_models"] == at_step_4["feature_models"]


@pytest.mark.slow
def test_a_resumed_run_evaluates_as_the_uninterrupted_one(
    trained, demo_shards, held_out, autoencoder, feature_models, tmp_path
):
    """Resumed from step 2, the run evaluates at step 4 with the same prompts, seeds and noise:
    the same numbers, bit for bit."""
    shutil.copytree(
        trained / "checkpoints" / "step_00000002", tmp_path / "checkpoints" / "step_00000002"
    )
    launch_training(
        *training_overrides(demo_shards, autoencoder, tmp_path),
        "logger=none",
        *eval_overrides(held_out, feature_models),
        nproc=1,
    )
    resumed, straight = (
        json.loads((run / "eval" / "step_00000004.json").read_text()) for run in (tmp_path, trained)
    )
    for key in ("loss", "loss_at_time", "fvd", "clip_score", "sample_losses"):
        assert resumed[key] == straight[key], key
    assert not (tmp_path / "eval" / "step_00000002.json").exists()  # evaluated before the copy


@pytest.mark.multiprocess
def test_fsdp_ranks_share_the_evaluation_and_agree_with_one_process(
    trained, demo_shards, held_out, autoencoder, feature_models, tmp_path
):
    """On 2 FSDP ranks every forward is collective: the ranks split the held-out batches and
    the videos, padding to the same count, and reach the single process's numbers (the
    training itself agrees to rounding)."""
    launch_training(
        *training_overrides(demo_shards, autoencoder, tmp_path),
        "parallel=fsdp",
        "logger=none",
        *eval_overrides(held_out, feature_models),
        nproc=2,
    )
    two, one = (
        json.loads((run / "eval" / "step_00000004.json").read_text()) for run in (tmp_path, trained)
    )
    assert two["samples"] == one["samples"] and two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["fvd"] == pytest.approx(one["fvd"], rel=1e-3)
    assert two["clip_score"] == pytest.approx(one["clip_score"], rel=1e-3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.fvd_model=/no/such/i3d.pt", "eval.fvd_model='/no/such/i3d.pt': no such file"),
        ("eval.clip_model=/no/such/clip", "eval.clip_model='/no/such/clip': no such file"),
        ("eval.prompts=/no/prompts.txt", "eval.prompts='/no/prompts.txt': no such file"),
        ("eval.video_shape=[5,32]", "eval.video_shape=\\[5, 32\\]: expected \\[frames"),
    ],
)
def test_a_wrong_evaluation_setting_fails_before_any_work(override, message):
    from omegaconf import OmegaConf

    values = ["eval.shards=held_out", "eval.videos=2", override]
    config = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(values))
    with pytest.raises(ValueError, match=message):
        to_config(config)

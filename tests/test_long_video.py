"""A minute of video as one sequence on the CPU (`experiment=long_video_cpu`): 421 frames of
the demo footage at 7 fps train for a few steps with ring attention over 2 gloo ranks (FSDP2,
activation checkpointing), and the sampling command makes a minute as one sequence over the
same ranks. The GPU preset (`experiment=long_video`) passes its layout checks at its size."""

from __future__ import annotations

import math

import pytest
from launching import launch_training, metrics, torchrun
from test_generation import read_mp4
from test_parallel import config

from data.demo import build_long_demo
from train.build import check_sequence_layout
from train.parallel import ParallelDims

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory):
    return build_long_demo(tmp_path_factory.mktemp("long_demo"), seconds=60.0)


@pytest.mark.multiprocess
def test_a_minute_trains_and_samples_as_one_sequence_over_two_ranks(
    long_shards, autoencoder, tmp_path
):
    run_dir = tmp_path / "run"
    launch_training(
        "experiment=long_video_cpu",
        f"data.shards={long_shards}",
        f"autoencoder.checkpoint={autoencoder}",
        f"train.run_dir={run_dir}",
        "train.steps=3",
        "train.checkpoint_every=3",
        "logger=none",
        nproc=2,
    )
    lines = metrics(run_dir)
    print([(line["train/loss"], line["progress/tokens_seen"]) for line in lines])
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(math.isfinite(line["train/loss"]) for line in lines)
    assert (
        lines[-1]["progress/tokens_seen"] == 3 * 106 * 6
    )  # one minute a step: 106 x (4 x 6) / (2 x 2)
    out = tmp_path / "minute.mp4"
    sampling = ["frames=421", "height=32", "width=48", "fps=7", "steps=2", f"out={out}"]
    torchrun("-m", "train.sample", f"checkpoint={run_dir}", "parallel.cp=2", *sampling)
    frames, duration, provenance = read_mp4(out)
    assert frames.shape == (421, 32, 48, 3) and duration >= 60.0
    assert provenance["parallel"] == {"cp": 2, "sp": 1}


def test_the_gpu_preset_splits_a_minute_of_720p_over_its_sequence_groups():
    preset = config("experiment=long_video", "data.shards=x", "autoencoder.checkpoint=y")
    dims = ParallelDims.resolve(preset.parallel, world_size=32)
    assert (dims.dp_shard, dims.cp, dims.sp) == (2, 8, 2)
    dims.check_model(preset.model.num_heads)
    check_sequence_layout(preset, dims)  # 1,299,600 tokens in 16 equal chunks
    uneven = config("experiment=long_video", "data.shards=x", "parallel.cp=7")
    with pytest.raises(ValueError, match=r"bucket \[1441, 720, 1280\] holds 1299600 tokens"):
        check_sequence_layout(uneven, ParallelDims.resolve(uneven.parallel, world_size=28))

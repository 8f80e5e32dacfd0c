"""Sora's generation modes end to end: a tiny DiT trained on the demo data with mixed frame
conditioning logs every mode to W&B, then the sampling command makes every mode, with the
expected frame counts, sizes, durations and provenance, alone and with each window one sequence
over two ranks (ring attention, torchrun); given frames come out as the autoencoder's round trip
of the inputs."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from launching import ROOT, torchrun
from PIL import Image
from test_train import dit_config

from data.decode import read_media
from train.__main__ import run
from train.sample import MODES, VideoGenerator, load, load_for_sampling, parse, sample_to_mp4
from train.sample import main as sample_main

FPS, HEIGHT, WIDTH = 8.0, 48, 80
pytestmark = pytest.mark.slow  # every test samples from a DiT trained for this module


@pytest.fixture(scope="module")
def trained(demo_shards, autoencoder, tmp_path_factory) -> Path:
    """A few steps of the demo preset (mixed conditioning), sampling every mode at the end."""
    run_dir = tmp_path_factory.mktemp("generation")
    losses = run(
        dit_config(
            demo_shards,
            autoencoder,
            run_dir,
            "train.steps=4",
            "train.checkpoint_every=4",
            "logger=wandb",
            "logger.mode=offline",
            "train.sample_steps=2",
            "train.sample_frames=9",
            f"train.sample_height={HEIGHT}",
            f"train.sample_width={WIDTH}",
            f"train.sample_fps={FPS}",
            "train.sample_prompts=[cyclists on a street]",
        )
    )
    assert len(losses) == 4 and all(np.isfinite(losses))
    return run_dir


def read_mp4(path: Path) -> tuple[np.ndarray, float, dict]:
    """(frames, duration in seconds, provenance) of an mp4."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        duration = float(stream.duration * stream.time_base)
        return frames, duration, json.loads(container.metadata.get("comment", "{}"))


def test_demo_preset_trains_with_mixed_modes_and_logs_every_mode(trained):
    (wandb_run,) = (trained / "wandb").glob("offline-run-*")
    logged = {p.name.split("_4_")[0] for p in (wandb_run / "files/media/videos").rglob("*.mp4")}
    assert logged == {f"{mode}_prompt_0" for mode in MODES}
    frames, _, provenance = read_mp4(trained / "samples" / "step_00000004_extend_prompt_0.mp4")
    assert len(frames) == 9 + 4  # extended by one window of 9 frames: 1 new latent frame
    assert provenance["mode"] == "extend" and provenance["prompt"] == "cyclists on a street"


def test_sampling_command_makes_every_mode(trained, tmp_path):
    video = trained / "samples" / "step_00000004_t2v_prompt_0.mp4"
    other = trained / "samples" / "step_00000004_edit_prompt_0.mp4"
    image = tmp_path / "still.png"
    Image.fromarray(read_mp4(video)[0][0]).save(image)
    common = [
        f"checkpoint={trained}",
        "steps=2",
        f"height={HEIGHT}",
        f"width={WIDTH}",
        f"fps={FPS}",
    ]
    cases = {  # name: (arguments, expected frames)
        "t2v": (["mode=t2v", "frames=9"], 9),
        "t2v_long": (["mode=t2v", "frames=17", "seconds=3"], 24),  # two windows
        "t2i": (["mode=t2i"], 1),
        "i2v": (["mode=i2v", f"image={image}", "frames=13"], 13),
        "extend_forward": (["mode=extend", f"video={video}", "seconds=1", "frames=13"], 9 + 8),
        "extend_backward": (
            ["mode=extend", f"video={video}", "seconds=1", "frames=13", "direction=backward"],
            9 + 8,
        ),
        "connect": (["mode=connect", f"video={video}", f"video2={other}", "seconds=1"], 9 + 8 + 9),
        "edit": (["mode=edit", f"video={video}", "strength=0.5"], 9),
    }
    parts = load(parse(common))  # the command's own steps, with the model loaded once
    for name, (arguments, expected_frames) in cases.items():
        cfg = parse(
            [*common, f"prompt=a {name} of cyclists", *arguments, f"out={tmp_path}/{name}.mp4"]
        )
        frames, duration, provenance = read_mp4(sample_to_mp4(parts, cfg))
        assert frames.shape == (expected_frames, HEIGHT, WIDTH, 3), name
        assert duration == pytest.approx(expected_frames / FPS), name
        assert provenance["prompt"] == f"a {name} of cyclists"
        assert provenance["mode"] == cfg.mode
        assert provenance["model"] == "tessera DiT tiny"
        assert Path(provenance["checkpoint"]).is_relative_to(trained)
        given = {
            key: value for key, value in vars(cfg).items() if key in ("image", "video", "video2")
        }
        assert provenance["inputs"] == {k: v for k, v in given.items() if v is not None}
    out = sample_main([*common, "mode=t2i", "prompt=a still", f"out={tmp_path}/cli.mp4"])
    assert read_mp4(out)[0].shape == (1, HEIGHT, WIDTH, 3)


@pytest.mark.multiprocess
def test_every_mode_samples_one_sequence_over_two_ranks_as_one_process(trained, tmp_path):
    """parallel.cp=2: each window's tokens split over 2 ranks (64x64: 16 tokens a latent frame,
    windows of even latent frames where frames are given). The mp4s match one process's, to
    the rounding of the ring's sums through the decoder and the mp4 encoder."""
    video = trained / "samples" / "step_00000004_t2v_prompt_0.mp4"
    image = tmp_path / "still.png"
    Image.fromarray(read_mp4(video)[0][0]).save(image)
    common = [f"checkpoint={trained}", "steps=2", "height=64", "width=64", f"fps={FPS}"]
    cases = {
        "t2v": ["mode=t2v", "frames=9"],
        "t2v_long": ["mode=t2v", "frames=13", "seconds=3"],
        "t2i": ["mode=t2i"],
        "i2v": ["mode=i2v", f"image={image}", "frames=13"],
        "extend": ["mode=extend", f"video={video}", "seconds=1", "frames=13"],
        "connect": ["mode=connect", f"video={video}", f"video2={video}", "seconds=1"],
        "edit": ["mode=edit", f"video={video}", "strength=0.5"],
    }
    parts = load(parse(common))
    for name, arguments in cases.items():
        sample_to_mp4(parts, parse([*common, *arguments, f"out={tmp_path}/one_{name}.mp4"]))
    spec = tmp_path / "spec.json"
    ring = {name: [*args, f"out={tmp_path}/ring_{name}.mp4"] for name, args in cases.items()}
    spec.write_text(json.dumps({"common": [*common, "parallel.cp=2"], "cases": ring}))
    torchrun(str(ROOT / "tests" / "sample_worker.py"), str(spec))
    for name in cases:
        (one, _, alone), (two, _, split) = (
            read_mp4(tmp_path / f"{kind}_{name}.mp4") for kind in ("one", "ring")
        )
        difference = np.abs(one.astype(int) - two.astype(int))
        print(name, one.shape, "mean", difference.mean(), "max", difference.max())
        assert one.shape == two.shape and difference.mean() < 0.5, name
        assert split["parallel"] == {"cp": 2, "sp": 1} and "parallel" not in alone


def test_the_sampling_command_over_ranks_writes_one_mp4(trained, tmp_path):
    out = tmp_path / "t2i.mp4"
    common = [f"checkpoint={trained}", "steps=1", "height=64", "width=64", "mode=t2i"]
    torchrun("-m", "train.sample", *common, "parallel.cp=2", f"out={out}")
    frames, _, provenance = read_mp4(out)
    assert frames.shape == (1, 64, 64, 3) and provenance["parallel"]["cp"] == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["mode=i2v"], "mode=i2v needs image=PATH"),
        (["mode=extend", "video=missing.mp4", "seconds=2"], "missing.mp4: no such image"),
        (["mode=t2v", "seconds=75"], r"seconds=75.0: must be in \(0, 60\]"),
        (["mode=zoom"], "mode='zoom' is not one of t2v, t2i"),
        (["mode=t2v", "height=50"], "height=50"),
        (["parallel.cp=2"], "cp 2 x sp 1 = 2 must equal the world size 1"),
    ],
)
def test_bad_sampling_arguments_are_named(trained, arguments, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sample_main([f"checkpoint={trained}", "steps=1", *arguments])


def test_given_frames_come_out_as_the_autoencoders_round_trip(trained, clips):
    """i2v: the first frame; extend: the last frames of the input (the window's given latent
    frames) come out as the autoencoder's round trip of the input, to a uint8 level."""
    parts = load_for_sampling(str(trained), "ema", torch.device("cpu"))
    generator = VideoGenerator(
        parts.dit, parts.autoencoder, parts.text_encoder, parts.config.flow, FPS, steps=3
    )
    real = read_media(clips / "bikes.mp4", (HEIGHT, WIDTH), FPS)[:9]

    animated = generator.image_to_video("cyclists", real[:1], frames=9)
    roundtrip = generator.roundtrip(real[:1])[0]
    assert np.abs(animated[0].astype(int) - roundtrip).max() <= 1
    assert np.abs(animated[1:].astype(int) - roundtrip).mean() > 2  # the rest is generated

    # One window of 13 frames: its first 2 latent frames are the input's last 5 frames, given.
    extended = generator.extend("cyclists", real, seconds=1.0, frames=13, direction="forward")
    context = 1 + 4 * (generator.context - 1)  # pixel frames of the given latent frames
    assert len(extended) == 9 + 8
    assert np.array_equal(extended[: 9 - context], real[: 9 - context])  # untouched
    given_part = extended[9 - context : 9].astype(int)
    assert np.abs(given_part - generator.roundtrip(real[9 - context :])).max() <= 1
    # Far tighter than how much the autoencoder itself changes the frames.
    assert np.abs(given_part - real[9 - context :]).mean() > 5 * np.abs(
        given_part - generator.roundtrip(real[9 - context :])
    ).mean().clip(min=0.01)

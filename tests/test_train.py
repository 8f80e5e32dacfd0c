"""End-to-end training on the demo data: both stages, the loss falling, exact resume,
checkpoint errors, the W&B offline run and the sampling command."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import av
import pytest
from hydra import compose, initialize_config_dir

from train.__main__ import run
from train.checkpoint import CheckpointError
from train.config import register_configs, to_config

ROOT = Path(__file__).resolve().parents[1]
register_configs()
pytestmark = pytest.mark.slow  # every test trains, on the session's trained autoencoder


def wandb_records(path: Path):
    """The records of a W&B run file (LevelDB-style log of 32 KiB blocks after a 7-byte
    header), so the test reads what an upload would send."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


def dit_config(demo_shards, autoencoder, run_dir, *overrides):
    return config(
        "experiment=demo",
        f"data.shards={demo_shards}",
        f"autoencoder.checkpoint={autoencoder}",
        f"train.run_dir={run_dir}",
        "logger=none",
        "train.sample_prompts=[]",
        *overrides,
    )


def test_flow_matching_loss_falls_over_200_steps(demo_shards, autoencoder, tmp_path):
    losses = run(
        dit_config(
            demo_shards, autoencoder, tmp_path, "train.steps=200", "train.checkpoint_every=1000"
        )
    )
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"\nflow-matching loss: first 20 steps {first:.4f}, last 20 steps {last:.4f}")
    assert last < 0.8 * first


def test_resume_gives_the_same_loss_as_an_uninterrupted_run(demo_shards, autoencoder, tmp_path):
    straight = tmp_path / "straight"
    losses = run(
        dit_config(
            demo_shards,
            autoencoder,
            straight,
            "train.steps=6",
            "train.checkpoint_every=3",
            "train.keep_last=5",
        )
    )
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        straight / "checkpoints" / "step_00000003", resumed_dir / "checkpoints" / "step_00000003"
    )
    resumed = run(
        dit_config(
            demo_shards, autoencoder, resumed_dir, "train.steps=6", "train.checkpoint_every=3"
        )
    )
    print(f"\nuninterrupted steps 4-6: {losses[3:]}\nresumed at 3, steps 4-6: {resumed}")
    assert resumed == losses[3:]


def test_corrupt_checkpoint_is_named_and_auto_resume_falls_back(demo_shards, autoencoder, tmp_path):
    run(dit_config(demo_shards, autoencoder, tmp_path, "train.steps=4", "train.checkpoint_every=2"))
    latest = tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="step_00000004/model.safetensors"):
        run(
            dit_config(
                demo_shards, autoencoder, tmp_path, "train.steps=5", f"train.resume={latest.parent}"
            )
        )
    # auto skips the broken one, resumes from step 2, and trains on to the end.
    losses = run(dit_config(demo_shards, autoencoder, tmp_path, "train.steps=5"))
    assert len(losses) == 3


def test_missing_shard_folder_is_named(autoencoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-shards-here"):
        run(dit_config(tmp_path / "no-shards-here", autoencoder, tmp_path / "run", "train.steps=1"))


def test_wandb_offline_run_holds_scalars_and_a_sample_video(demo_shards, autoencoder, tmp_path):
    run(
        dit_config(
            demo_shards,
            autoencoder,
            tmp_path,
            "train.steps=4",
            "train.log_every=2",
            "logger=wandb",
            "logger.mode=offline",
            "train.sample_steps=4",
            "train.sample_frames=9",
            "train.sample_height=48",
            "train.sample_width=80",
            "train.sample_prompts=[a rabbit in a meadow]",
        )
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = [
        r.history
        for r in wandb_records(next(runs[0].glob("run-*.wandb")))
        if r.WhichOneof("record_type") == "history"
    ]
    logged = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
        for h in history
    ]
    assert [entry["_step"] for entry in logged] == [2, 4]
    assert all(entry["train/loss"] > 0 and entry["perf/tokens_per_s"] > 0 for entry in logged)
    logged_keys = {"train/lr", "train/grad_norm", "perf/data_wait_share", "perf/peak_rss_gib"}
    assert logged_keys <= set(logged[-1])
    videos = list((runs[0] / "files" / "media" / "videos").rglob("*.mp4"))
    assert videos, "no sample video in the W&B run"
    with av.open(str(videos[0])) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (80, 48)
    from train.sample import main as sample_main

    out = sample_main(
        [
            f"checkpoint={tmp_path}",
            "prompt=cyclists on a street",
            "frames=5",
            "height=64",
            "width=96",
            "steps=3",
            f"out={tmp_path / 'cli.mp4'}",
        ]
    )
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (stream.codec_context.width, stream.codec_context.height, frames) == (96, 64, 5)
        assert "cyclists on a street" in container.metadata["comment"]

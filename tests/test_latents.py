"""Latent shards (`python -m train.encode`, data/latents.py): training on them matches online
encoding, their bytes do not depend on the number of ranks or on a crash, a run refuses shards
of other encoders, a broken sample is skipped, and the encoders stay unbuilt."""

from __future__ import annotations

import filecmp
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hydra import compose, initialize_config_dir
from launching import PACKED, process_env, run_checked, torchrun_command

from data.latents import RECORD_NAME
from data.manifest import index_shards, write_manifest
from data.pipeline import BatchStream, open_plan
from data.plan import DataState
from train.__main__ import run
from train.config import register_configs, to_config
from train.encode import main as encode
from train.runtime import init_runtime
from train.stages import AutoencoderStage, DiTStage

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


def demo(autoencoder: Path, shards: Path, *extra: str) -> list[str]:
    """The demo experiment on `shards`, cut as data.augment=false cuts, with nothing to sample."""
    return [
        "experiment=demo",
        f"autoencoder.checkpoint={autoencoder}",
        f"data.shards={shards}",
        "data.augment=false",
        "logger=none",
        "train.sample_prompts=[]",
        *extra,
    ]


@pytest.fixture(scope="module")
def latents(demo_shards, autoencoder, tmp_path_factory) -> Path:
    """The demo shards encoded in float32, with the posterior's log-variance."""
    out = tmp_path_factory.mktemp("latents")
    report = encode(
        ["--out", str(out), "--dtype", "float32", "--logvar", *demo(autoencoder, demo_shards)]
    )
    assert report["samples"] > 100 and not report["skipped"]
    return out


def train(autoencoder: Path, shards: Path, run_dir: Path, steps: int, *extra: str) -> list[float]:
    overrides = demo(
        autoencoder,
        shards,
        f"train.run_dir={run_dir}",
        f"train.steps={steps}",
        "train.checkpoint_every=1000",
        "train.record_samples=true",
        *extra,
    )
    return run(config(*overrides))


def consumed_keys(run_dir: Path) -> list[list[str]]:
    lines = (run_dir / "consumed" / "rank0.jsonl").read_text().splitlines()
    return [json.loads(line)["keys"] for line in lines]


def test_fifty_steps_on_latent_shards_match_online_encoding(
    demo_shards, autoencoder, latents, tmp_path
):
    """The latents are the encoders' float32 outputs, stored in float32: the only difference
    left is that train.encode encodes other groups of samples than a training batch, and a conv
    or matmul may round a row differently in another batch. So the losses must agree to float32
    rounding, carried through 50 optimizer steps: rtol 1e-5. (On CPU they agree bit for bit.)"""
    online = train(autoencoder, demo_shards, tmp_path / "online", 50)
    stored = train(autoencoder, latents, tmp_path / "latents", 50)
    assert len(online) == len(stored) == 50
    np.testing.assert_allclose(stored, online, rtol=1e-5, atol=0)
    assert consumed_keys(tmp_path / "latents") == consumed_keys(tmp_path / "online")


def test_a_run_on_latent_shards_resumes_exactly(autoencoder, latents, tmp_path):
    """The same plan and DataState as pixels: resumed from step 3's checkpoint, steps 4-6 are
    those of the uninterrupted run, bit for bit."""
    straight = tmp_path / "straight"
    every = ("train.checkpoint_every=3", "train.keep_last=5")
    losses = train(autoencoder, latents, straight, 6, *every)
    resumed_dir = tmp_path / "resumed"
    step_3 = Path("checkpoints") / "step_00000003"
    shutil.copytree(straight / step_3, resumed_dir / step_3)
    resumed = train(autoencoder, latents, resumed_dir, 6, *every)
    assert resumed == losses[3:]
    assert consumed_keys(resumed_dir) == consumed_keys(straight)[3:]


def test_posterior_draws_match_online_encoding(demo_shards, autoencoder, latents, tmp_path):
    """train.sample_posterior draws mean + std * noise, with the same seeded noise online and
    from stored log-variances."""
    posterior = ("train.sample_posterior=true",)
    online = train(autoencoder, demo_shards, tmp_path / "online", 5, *posterior)
    stored = train(autoencoder, latents, tmp_path / "latents", 5, *posterior)
    np.testing.assert_allclose(stored, online, rtol=1e-5, atol=0)
    mean_only = train(autoencoder, latents, tmp_path / "mean", 5)
    assert mean_only != stored


def test_a_run_on_latents_builds_no_encoder_until_it_evaluates_or_samples_pixels(
    demo_shards, autoencoder, latents, tmp_path
):
    cfg = config(
        *demo(autoencoder, latents, "train.sample_prompts=[a rabbit]", "train.sample_steps=2"),
        f"eval.shards={demo_shards}",
        "eval.samples=4",
    )
    runtime = init_runtime("cpu", "fp32")
    stage = DiTStage(cfg, runtime)
    assert stage.encoders.loaded == []
    plan = open_plan(cfg.data, stage.table)
    stream = BatchStream(cfg.data, plan, 0, 1, DataState(0, 0, 0))
    batch = next(iter(stream))
    assert batch.video is None and batch.latents.dtype == torch.float32
    loss = stage.objective(stage.model, batch, runtime.device)
    assert torch.isfinite(loss.total) and stage.encoders.loaded == []

    evaluator = stage.evaluator(cfg, _single_rank(cfg), tmp_path)  # held-out pixels: encoded
    assert len(evaluator.batches) >= 1 and stage.encoders.loaded == []  # ... and released
    sample = stage.sampler(cfg, plan, tmp_path)
    videos = sample(stage.model.state_dict(), 0)
    assert all(path.stat().st_size > 0 for path in videos.values())
    assert stage.encoders.loaded == []


def _single_rank(cfg):
    from train.parallel import ParallelDims

    return ParallelDims.resolve(cfg.parallel, 1, 0)


def perturbed_copy(weights: Path, out: Path) -> Path:
    tensors = safetensors.torch.load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    safetensors.torch.save_file(tensors, str(out))
    return out


@pytest.fixture(scope="module")
def packed_latents(demo_shards, autoencoder, tmp_path_factory) -> Path:
    """The demo shards encoded at their packing target shapes, in float32, with the posterior's
    log-variance."""
    out = tmp_path_factory.mktemp("packed-latents")
    settings = demo(autoencoder, demo_shards, *PACKED)
    report = encode(["--out", str(out), "--dtype", "float32", "--logvar", *settings])
    assert report["samples"] > 100 and not report["skipped"]
    return out


def test_packed_latent_shards_give_the_losses_of_packed_online_encoding(
    demo_shards, autoencoder, latents, packed_latents, tmp_path
):
    """Each sample stored at its own target shape: the plan packs the latent shards as it packs
    the pixels, and the losses agree to float32 rounding (see the test above)."""
    online = train(autoencoder, demo_shards, tmp_path / "online", 20, *PACKED)
    stored = train(autoencoder, packed_latents, tmp_path / "latents", 20, *PACKED)
    assert len(online) == len(stored) == 20
    np.testing.assert_allclose(stored, online, rtol=1e-5, atol=0)
    assert consumed_keys(tmp_path / "latents") == consumed_keys(tmp_path / "online")
    # Posterior draws: the same seeded noise per sample, online and from stored log-variances.
    posterior = (*PACKED, "train.sample_posterior=true")
    online = train(autoencoder, demo_shards, tmp_path / "online-posterior", 3, *posterior)
    stored = train(autoencoder, packed_latents, tmp_path / "latents-posterior", 3, *posterior)
    np.testing.assert_allclose(stored, online, rtol=1e-5, atol=0)
    # Latents cut for buckets cannot serve native sizes, nor these targets other ones.
    with pytest.raises(ValueError, match=r"encoded with packing=None"):
        train(autoencoder, latents, tmp_path / "buckets", 2, *PACKED)
    with pytest.raises(ValueError, match=r"encoded with packing=\[240, 17, 0.1\]"):
        train(autoencoder, packed_latents, tmp_path / "other", 2, *PACKED, "packing.max_frames=9")


def test_training_with_other_encoders_or_buckets_fails_before_the_first_step(
    demo_shards, autoencoder, latents, tmp_path
):
    other = perturbed_copy(autoencoder, tmp_path / "other.safetensors")
    cases = [
        (
            [f"autoencoder.checkpoint={other}"],
            rf"encoded with the autoencoder causal_vae {autoencoder}.*this run configures "
            rf"causal_vae {other}",
        ),
        (["text_encoder.max_length=32"], "encoded with the text_encoder .*max_length.*64"),
        (["buckets.buckets=[[17,64,64],[1,64,64]]"], "encoded with buckets="),
        (["data.fps=4"], "encoded with fps=8.0, but this run has 4.0"),
    ]
    for index, (overrides, message) in enumerate(cases):
        run_dir = tmp_path / f"run{index}"
        with pytest.raises(ValueError, match=message):
            train(autoencoder, latents, run_dir, 2, *overrides)
        assert not (run_dir / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match=r"eval.shards=.* were encoded with the autoencoder"):
        train(other, demo_shards, tmp_path / "eval", 2, f"eval.shards={latents}")
    # The batch size follows the token budget, which may change: the buckets stay the same.
    assert len(train(autoencoder, latents, tmp_path / "budget", 2, "buckets.token_budget=960"))


def test_latent_shards_are_refused_where_they_cannot_serve(
    demo_shards, autoencoder, latents, tmp_path
):
    with pytest.raises(ValueError, match="mixes latent shards"):
        train(autoencoder, f"'{latents},{demo_shards}'", tmp_path / "mixed", 2)
    with pytest.raises(ValueError, match="the autoencoder stage trains on pixels"):
        AutoencoderStage(config(*demo(autoencoder, latents)), init_runtime("cpu", "fp32"))
    with pytest.raises(ValueError, match="are latent shards already"):
        encode(["--out", str(tmp_path / "again"), *demo(autoencoder, latents)])
    untrained = ["experiment=demo", "autoencoder.checkpoint=null", f"data.shards={demo_shards}"]
    with pytest.raises(ValueError, match="autoencoder.checkpoint is not set"):
        encode(["--out", str(tmp_path / "x"), *untrained])
    with pytest.raises(
        ValueError, match=r"holds an encoding made with other record.latents, record.text"
    ):
        encode(["--out", str(latents), "--dtype", "bfloat16", *demo(autoencoder, demo_shards)])


def test_sample_posterior_needs_stored_log_variances(demo_shards, autoencoder, tmp_path):
    out = tmp_path / "mean_only"
    shards = _few_shards(demo_shards, tmp_path)
    encode(["--out", str(out), *demo(autoencoder, shards)])
    with pytest.raises(ValueError, match="does not store: encode them again with --logvar"):
        train(autoencoder, out, tmp_path / "run", 2, "train.sample_posterior=true")


def _few_shards(demo_shards: Path, tmp_path: Path) -> Path:
    """A manifest of the demo's first 60 samples (whole encodings cost time)."""
    import pyarrow.parquet as pq

    table = pq.read_table(demo_shards / "manifest.parquet").slice(0, 60)
    folder = tmp_path / "few"
    folder.mkdir()
    shards = [str(demo_shards / name) for name in table.column("shard").to_pylist()]
    table = table.set_column(table.schema.get_field_index("shard"), "shard", [shards])
    write_manifest(table, str(folder / "manifest.parquet"))
    return folder


def test_a_latent_sample_with_a_truncated_member_is_skipped_and_counted(
    autoencoder, latents, tmp_path
):
    """A copy of the latent shards in which the latents member of the first sample of epoch 0's
    first batch is cut in half: that batch comes without it, counting it as skipped."""
    cfg = config(*demo(autoencoder, latents))
    table = DiTStage(cfg, init_runtime("cpu", "fp32")).table
    first = open_plan(cfg.data, table).batch(0, 0, 0)
    victim = open_plan(cfg.data, table).key(first.sample_ids[0])
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (RECORD_NAME, "null_caption.safetensors"):
        (broken / name).write_bytes((latents / name).read_bytes())
    names = sorted(p.name for p in latents.glob("*.tar"))
    for name in names:
        with tarfile.open(latents / name) as source, tarfile.open(broken / name, "w") as copy:
            for member in source:
                data = source.extractfile(member).read()
                if member.name == f"{victim}.latents.safetensors":
                    data = data[: len(data) // 2]
                member.size = len(data)
                copy.addfile(member, io.BytesIO(data))
    manifest = index_shards([str(broken / name) for name in names], names)
    write_manifest(manifest, str(broken / "manifest.parquet"))

    broken_data = replace(cfg.data, shards=str(broken))
    plan = open_plan(broken_data, table)
    planned = plan.batch(0, 0, 0)
    assert plan.key(planned.sample_ids[0]) == victim
    stream = BatchStream(broken_data, plan, 0, 1, DataState(0, 0, 0))
    batch = stream.load(planned, 0, 0, DataState(0, 0, 0))
    assert batch.skipped == 1 and victim not in batch.keys
    assert len(batch.keys) == len(batch.latents) == len(planned.sample_ids) - 1


@pytest.mark.multiprocess
def test_two_ranks_encode_the_same_bytes_as_one_and_a_killed_run_resumes_to_them(
    demo_shards, autoencoder, tmp_path
):
    shards = _few_shards(demo_shards, tmp_path)
    args = ["--samples-per-shard", "6", "--batch-size", "4", *demo(autoencoder, shards)]
    outputs = {}
    for ranks in (1, 2):
        outputs[ranks] = tmp_path / f"ranks{ranks}"
        command = torchrun_command(
            "-m", "train.encode", "--out", str(outputs[ranks]), *args, nproc=ranks
        )
        run_checked(command, timeout=600)
    assert_same_files(outputs[1], outputs[2])

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "train.encode", "--out", str(killed), *args]
    process = subprocess.Popen(command, cwd=ROOT, env=process_env(), stderr=subprocess.DEVNULL)
    parts = killed / ".encode" / "parts"
    deadline = time.monotonic() + 300
    while len(list(parts.glob("*.parquet"))) < 3 and time.monotonic() < deadline:
        assert process.poll() is None, "the encoding ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    committed = len(list(parts.glob("*.parquet")))
    total = len(list(outputs[1].glob("*.tar")))
    assert 3 <= committed < total and not (killed / RECORD_NAME).exists()
    run_checked(command, timeout=600)
    assert_same_files(outputs[1], killed)


def assert_same_files(expected: Path, actual: Path) -> None:
    names = sorted(p.name for p in expected.iterdir() if p.is_file())
    assert names == sorted(p.name for p in actual.iterdir() if p.is_file())
    assert {"manifest.parquet", RECORD_NAME, "report.json"} <= set(names)
    assert len([n for n in names if n.endswith(".tar")]) >= 8
    _, differ, errors = filecmp.cmpfiles(expected, actual, names, shallow=False)
    assert not differ and not errors, f"{differ or errors} differ between {expected} and {actual}"

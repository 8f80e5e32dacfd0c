"""Checkpoints, exact resume and fault tolerance, on real 2-rank gloo runs of the tiny DiT.

- 12 steps straight = 6 steps, stop, resume, 6 steps: the same losses and final weights, bit for
  bit, with fsdp and with zero2;
- `kill -9` of one rank under `torchrun --max_restarts 1`: the run restarts, resumes from its
  latest checkpoint and ends with the uninterrupted run's weights;
- a crash halfway through writing a checkpoint leaves the previous one as the latest;
- a checkpoint at cp=2 resumes at cp=1, and the reverse, with its state bit for bit, the same
  samples, and the same losses to rounding;
- asynchronous saves write the checkpoints blocking saves write, bit for bit (one process and
  FSDP2); a kill while the background writer writes and SIGUSR1 during a save are handled as
  with blocking saves;
- an FSDP checkpoint of 2 ranks resumes on 1, and one of 1 rank on 2, consuming exactly the
  samples an uninterrupted run would, none twice and none skipped;
- SIGUSR1 checkpoints the current step and exits with the preemption code;
- a truncated checkpoint file is named and auto-resume falls back to the previous checkpoint;
- a ZeRO checkpoint resumed on another number of ranks fails, naming universal checkpoints;
- NaN losses skip their steps; too many in a row stop the run without touching checkpoints.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_dir
from launching import (
    PACKED,
    ROOT,
    launch_training,
    metrics,
    process_env,
    random_seed,
    step_losses,
    torchrun_command,
)
from safetensors.torch import load_file

from train.__main__ import run
from train.checkpoint import find_weights, read_weights
from train.config import register_configs, to_config
from train.objectives import FlowMatchingObjective
from train.signals import PREEMPTED_EXIT_CODE

register_configs()
STEPS = 12


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """The runs' shared settings; `extra` adds or replaces keys ("train.steps=9")."""
    values = {
        "data.shards": shards,
        "train.run_dir": run_dir,
        "train.steps": STEPS,
        "train.log_every": 1,
        "train.checkpoint_every": 3,
        "train.keep_last": 10,
        "train.sample_prompts": "[]",
        "train.ema_decay": 0.9,
        "optim.lr": 2e-3,
        "optim.warmup_steps": 2,
        "logger": "none",
    }
    values |= dict(item.split("=", 1) for item in extra)
    return [f"{key}={value}" for key, value in values.items()]


def copy_checkpoint(source: Path, step: int, run_dir: Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, run_dir / "checkpoints" / name)


def same_tensors(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def same_weights(a: Path, b: Path) -> bool:
    """Exported (EMA) weights of two runs, compared bit for bit."""
    return same_tensors(*(load_file(run / "export" / "model.safetensors") for run in (a, b)))


@pytest.fixture(scope="module")
def straight_runs(demo_shards, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted 12-step runs, checkpointing every 3 steps, per backend."""
    runs = {}
    for backend in ("fsdp", "zero2"):
        runs[backend] = tmp_path_factory.mktemp(f"straight_{backend}")
        launch_training(*overrides(demo_shards, runs[backend], f"parallel={backend}"))
    return runs


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["fsdp", "zero2"])
def test_stop_and_resume_is_bitwise_identical(backend, straight_runs, demo_shards, tmp_path):
    straight = straight_runs[backend]
    copy_checkpoint(straight, 6, tmp_path)
    result = launch_training(*overrides(demo_shards, tmp_path, f"parallel={backend}"))
    assert "resumed from step 6" in result.stdout + result.stderr
    expected, resumed = step_losses(straight)[6:], step_losses(tmp_path)
    print(f"\n{backend}: steps 7-12 straight {expected}\n{backend}: resumed at 6     {resumed}")
    assert resumed == expected
    assert same_weights(straight, tmp_path)


@pytest.mark.multiprocess
def test_killed_rank_restarts_and_ends_with_the_same_weights(straight_runs, demo_shards, tmp_path):
    seed = random_seed()
    kill_after = random.Random(seed).randint(4, 9)
    replay = f"replay with TESSERA_TEST_SEED={seed} (kill after step {kill_after})"
    print(f"\n{replay}")
    # The restarted ranks must not read the first attempt's addresses from the agent's store
    # (train.runtime._attempt_store).
    command = torchrun_command(
        "-m", "train", *overrides(demo_shards, tmp_path, "parallel=fsdp"),
        torchrun_args=("--max_restarts=1",),
    )  # fmt: skip
    agent = subprocess.Popen(
        command, cwd=ROOT, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    wait_for_step(tmp_path, kill_after, agent)
    victim = worker_pids(agent.pid)[-1]
    subprocess.run(["kill", "-9", str(victim)], check=True)
    output = agent.communicate(timeout=300)[0].decode()
    steps_logged = [line["step"] for line in metrics(tmp_path)]
    print(f"\nkilled rank pid {victim} after step {kill_after}; steps logged: {steps_logged}")
    assert agent.returncode == 0, f"{replay}\n{output[-3000:]}"
    resumed = re.search(r"resumed from step (\d+)", output)
    assert resumed, f"{replay}: no resume in\n{output[-3000:]}"
    resumed_at = int(resumed.group(1))
    assert resumed_at % 3 == 0 and resumed_at <= kill_after + 1, (
        f"{replay}: resumed at {resumed_at}"
    )
    assert steps_logged[-1] == STEPS, f"{replay}: steps logged {steps_logged}"
    assert same_weights(straight_runs["fsdp"], tmp_path), replay


def same_checkpoints(blocking: Path, asynchronous: Path) -> None:
    """Every checkpoint of two runs holds the same bytes, but for what names the run: the
    config in trainer.json (so the sizes in the manifest) and DCP's save ids and paths."""
    names = sorted(p.name for p in (blocking / "checkpoints").glob("step_*"))
    assert names == sorted(p.name for p in (asynchronous / "checkpoints").glob("step_*"))
    for name in names:
        first, second = blocking / "checkpoints" / name, asynchronous / "checkpoints" / name
        files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
        for file in files:
            a, b = first / file, second / file
            if file.name == "trainer.json":
                a, b = (json.loads(x.read_text()) for x in (a, b))
                assert {**a, "config": None} == {**b, "config": None}, file
            elif file.name == ".metadata":
                a, b = (dcp.FileSystemReader(x.parent).read_metadata() for x in (a, b))
                assert a.state_dict_metadata == b.state_dict_metadata, file
                assert a.storage_data == b.storage_data, file
            elif file.name != "manifest.json":
                assert a.read_bytes() == b.read_bytes(), f"{name}/{file}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["none", "fsdp"])
def test_asynchronous_saves_write_what_blocking_saves_write(
    backend, straight_runs, demo_shards, tmp_path
):
    """The same run with asynchronous saves: the same checkpoints, bit for bit, and the same
    final weights (one process, and FSDP2 on 2 ranks against the straight run)."""
    blocking = straight_runs["fsdp"] if backend == "fsdp" else tmp_path / "blocking"
    ranks = 2 if backend == "fsdp" else 1
    if backend == "none":
        launch_training(*overrides(demo_shards, blocking), nproc=1)
    asynchronous = tmp_path / "asynchronous"
    settings = (f"parallel={backend}", "train.checkpoint_async=true")
    launch_training(*overrides(demo_shards, asynchronous, *settings), nproc=ranks)
    same_checkpoints(blocking, asynchronous)
    assert same_weights(blocking, asynchronous)


@pytest.mark.multiprocess
@pytest.mark.parametrize("saving", ["blocking", "asynchronous"])
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    saving, straight_runs, demo_shards, tmp_path
):
    """Killed with step 6's files written but not committed (asynchronous: by the background
    writer, while training goes on): step 3 stays the latest, and the resumed run ends with the
    uninterrupted run's weights."""
    asynchronous = f"train.checkpoint_async={saving == 'asynchronous'}"
    args = overrides(demo_shards, tmp_path, "parallel=fsdp", asynchronous)
    crashed = subprocess.run(
        torchrun_command("-m", "train", *args),
        cwd=ROOT,
        env=process_env(TESSERA_FAULT="checkpoint@6"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    checkpoints = tmp_path / "checkpoints"
    assert crashed.returncode != 0
    assert (checkpoints / "latest").read_text() == "step_00000003"
    half_written = checkpoints / ".tmp_step_00000006"
    print(f"\nleft behind by the crash: {sorted(p.name for p in half_written.rglob('*'))}")
    assert (half_written / "dcp").is_dir() and not (half_written / "manifest.json").exists()

    result = launch_training(*args)
    assert "resumed from step 3" in result.stdout + result.stderr
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:08d}"
    assert same_weights(straight_runs["fsdp"], tmp_path)


@pytest.mark.multiprocess
def test_zero_checkpoint_on_another_world_size_fails_naming_universal_checkpoints(
    straight_runs, demo_shards, tmp_path
):
    copy_checkpoint(straight_runs["zero2"], 6, tmp_path)
    command = [sys.executable, "-m", "train", *overrides(demo_shards, tmp_path, "parallel=zero2")]
    result = subprocess.run(
        command, cwd=ROOT, env=process_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "tied to 2 data-parallel ranks, not 1" in result.stderr
    assert "ds_to_universal.py" in result.stderr
    assert not (tmp_path / "checkpoints" / "step_00000009").exists()


def consumed(run_dir: Path, up_to: int, after: int = 0) -> list[str]:
    """Keys consumed in steps (after, up_to], in global plan order (rank 0's batch first)."""
    records = [
        json.loads(line)
        for rank_file in sorted((run_dir / "consumed").glob("rank*.jsonl"))
        for line in rank_file.read_text().splitlines()
    ]
    # A stable sort by step keeps rank 0's record before rank 1's within a step.
    by_step = sorted((r for r in records if after < r["step"] <= up_to), key=lambda r: r["step"])
    return [key for record in by_step for key in record["keys"]]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("before", "after", "packing"), [(2, 1, ()), (1, 2, ()), (2, 1, PACKED), (1, 2, PACKED)]
)
def test_fsdp_resumes_on_another_world_size_without_repeating_samples(
    before, after, packing, demo_shards, tmp_path
):
    # Reference: one rank, one batch (bucketed, or one pack) per step, 9 of the global plan.
    reference_dir = tmp_path / "reference"
    extra = ("parallel=fsdp", "train.record_samples=true", "train.steps=9", *packing)
    launch_training(*overrides(demo_shards, reference_dir, *extra), nproc=1)
    reference = consumed(reference_dir, 9)

    first, second = tmp_path / "first", tmp_path / "second"
    common = (*extra[:2], *packing)
    launch_training(*overrides(demo_shards, first, *common, "train.steps=3"), nproc=before)
    copy_checkpoint(first, 3, second)
    steps_left = (9 - 3 * before) // after
    total = 3 + steps_left
    launch_training(*overrides(demo_shards, second, *common, f"train.steps={total}"), nproc=after)
    keys_before, keys_after = consumed(first, 3), consumed(second, total, after=3)
    print(
        f"\n{before} rank(s), steps 1-3: {keys_before}\n{after} rank(s), steps 4-{total}: {keys_after}"
    )
    assert len(set(keys_before + keys_after)) == len(keys_before + keys_after)  # none twice
    assert keys_before + keys_after == reference  # none skipped, in the plan's order


@pytest.mark.multiprocess
@pytest.mark.parametrize(("saved_cp", "resumed_cp"), [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_context_parallel_degree(
    saved_cp, resumed_cp, demo_shards, tmp_path
):
    """cp=2 on 2 ranks and cp=1 on 1 train the same global batch. A checkpoint of either resumes
    on the other with its state bit for bit (resumed and exported at once, the EMA is the saved
    one), then consumes the same samples, with losses that match the saved degree's own
    continuation to rounding: the ring merges its partial sums in another order."""
    extra = ("parallel=fsdp", "train.record_samples=true", "train.steps=6", *PACKED)
    straight, resumed, carried = (tmp_path / name for name in ("straight", "resumed", "carried"))
    launch_training(
        *overrides(demo_shards, straight, *extra, f"parallel.cp={saved_cp}"), nproc=saved_cp
    )
    at_new_degree = (*extra, f"parallel.cp={resumed_cp}")
    copy_checkpoint(straight, 3, carried)
    launch_training(
        *overrides(demo_shards, carried, *at_new_degree, "train.steps=3"), nproc=resumed_cp
    )
    saved = read_weights(find_weights(straight / "checkpoints" / "step_00000003"))
    assert same_tensors(load_file(carried / "export" / "model.safetensors"), saved)
    copy_checkpoint(straight, 3, resumed)
    result = launch_training(*overrides(demo_shards, resumed, *at_new_degree), nproc=resumed_cp)
    assert "resumed from step 3" in result.stdout + result.stderr
    expected, losses = step_losses(straight)[3:], step_losses(resumed)
    print(f"\ncp={saved_cp} steps 4-6 {expected}\nresumed at cp={resumed_cp} {losses}")
    assert losses == pytest.approx(expected, rel=1e-5) and losses != step_losses(straight)[:3]
    assert consumed(resumed, 6, after=3) == consumed(straight, 6, after=3)


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before the step to interrupt"
        lines = metrics(run_dir)
        if lines and lines[-1]["step"] >= step:
            return lines
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def worker_pids(agent_pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True)
    return sorted(int(pid) for pid in children.stdout.split())


@pytest.mark.multiprocess
@pytest.mark.parametrize("saving", ["blocking", "asynchronous"])
def test_sigusr1_checkpoints_the_current_step_and_exits(saving, demo_shards, tmp_path):
    """Asynchronous saves every 3 steps: the signal may come while one is being written; the
    run waits for it, then saves and commits the step it stops at."""
    asynchronous = f"train.checkpoint_async={saving == 'asynchronous'}"
    args = overrides(demo_shards, tmp_path, "parallel=fsdp", "train.steps=500", asynchronous)
    agent = subprocess.Popen(
        torchrun_command("-m", "train", *args),
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    first = wait_for_step(tmp_path, 2, agent)[-1]["step"], time.monotonic()
    lines = wait_for_step(tmp_path, 4, agent)
    sent = time.monotonic()
    step_time = (sent - first[1]) / (lines[-1]["step"] - first[0])
    for pid in worker_pids(agent.pid):  # as SLURM signals every task
        subprocess.run(["kill", "-USR1", str(pid)], check=True)
    output = agent.communicate(timeout=120)[0].decode()
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    last_step = metrics(tmp_path)[-1]["step"]
    print(
        f"\nUSR1 after step {lines[-1]['step']}: checkpoint {latest} and exit "
        f"{time.monotonic() - sent:.1f} s later (a step takes about {step_time:.1f} s)"
    )
    assert time.monotonic() - sent < 2 * step_time + 20  # finish the step, save, exit
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in output
    assert latest == f"step_{last_step:08d}" and last_step <= lines[-1]["step"] + 1
    assert f"stopping at step {last_step} on SIGUSR1" in output


@pytest.mark.multiprocess
def test_truncated_sharded_checkpoint_is_named_and_skipped(straight_runs, demo_shards, tmp_path):
    shutil.copytree(straight_runs["fsdp"] / "checkpoints", tmp_path / "checkpoints")
    shard = sorted((tmp_path / "checkpoints" / "step_00000012" / "dcp").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    args = overrides(demo_shards, tmp_path, "parallel=fsdp", "train.steps=13")
    explicit = subprocess.run(
        torchrun_command("-m", "train", *args, f"train.resume={shard.parent.parent}"),
        cwd=ROOT,
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert explicit.returncode != 0
    assert f"checkpoint file {shard} has 1000 bytes" in explicit.stderr
    result = launch_training(*args)  # auto: falls back to step 9 and trains to 13
    assert "resumed from step 9" in result.stdout + result.stderr
    assert [line["step"] for line in metrics(tmp_path)] == [10, 11, 12, 13]


def config(*values: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_config(compose("config", overrides=list(values)))


@pytest.mark.slow
def test_nan_steps_are_skipped_and_too_many_stop_the_run(demo_shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = FlowMatchingObjective.__call__
    bad_from = 3

    def sometimes_nan(self, model, batch, device):
        calls["n"] += 1
        loss = original(self, model, batch, device)
        if calls["n"] >= bad_from:  # every step from the 3rd on
            loss.total = loss.total * float("nan")
        return loss

    monkeypatch.setattr(FlowMatchingObjective, "__call__", sometimes_nan)
    args = overrides(demo_shards, tmp_path, "train.checkpoint_every=2", "train.max_bad_steps=3")
    with pytest.raises(FloatingPointError, match="NaN/Inf for 4 steps in a row") as error:
        run(config(*args))
    print(f"\n{error.value}")
    # Steps 3-5 were skipped; step 6, the 4th bad one in a row, stopped the run unsaved.
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert not (checkpoints / "step_00000006").exists()
    assert [line["train/skipped_steps"] for line in metrics(tmp_path)] == [0, 0, 1, 2, 3]
    # Skipped steps apply nothing: the weights at step 4 are those of step 2.
    at_2, at_4 = (load_file(checkpoints / f"step_0000000{s}" / "model.safetensors") for s in (2, 4))
    assert all(torch.equal(at_2[k], at_4[k]) for k in at_2)

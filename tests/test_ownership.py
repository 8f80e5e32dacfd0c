"""One live run per run directory: the claim files of train/ownership.py, with real processes
holding and racing for them, and real training runs on one directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from launching import ROOT, metrics, process_env

from train.ownership import (
    STALE_AFTER_S,
    Claim,
    RunDirectoryInUse,
    claim_path,
    claim_run_dir,
    create,
    process_start,
    read_claim,
    this_process,
)

HOLD = (
    "import sys, time; from pathlib import Path; from train.ownership import claim_run_dir\n"
    "claim_run_dir(Path(sys.argv[1])); print('claimed', flush=True); time.sleep(300)"
)


def claims(run_dir: Path) -> list[Claim]:
    return [read_claim(path) for path in sorted((run_dir / "owner").glob("claim_*.json"))]


def held_elsewhere(run_dir: Path, **fields) -> Claim:
    """A claim as another process (or host) would have left it: claim number 1."""
    claim = replace(this_process(), **fields)
    (run_dir / "owner").mkdir(parents=True)
    assert create(claim_path(run_dir / "owner", 1), claim)
    return claim


@pytest.fixture
def holder(tmp_path):
    """A live process on this host that owns tmp_path."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        cwd=ROOT, env=process_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout.readline() == "claimed\n"
    yield process
    process.kill()
    process.wait()


def test_a_live_owner_on_this_host_is_named_and_a_killed_one_is_taken_over(holder, tmp_path):
    with pytest.raises(RunDirectoryInUse) as refused:
        claim_run_dir(tmp_path)
    print(f"\n{refused.value}")
    assert f"pid {holder.pid} on host {socket.gethostname()}" in str(refused.value)

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    claim_run_dir(tmp_path)
    (mine,) = claims(tmp_path)  # the dead owner's claim is gone
    assert (mine.pid, mine.host) == (os.getpid(), socket.gethostname())
    assert (tmp_path / "owner" / "claim_00000002.json").exists()


def test_a_reused_pid_does_not_keep_a_dead_owners_claim(tmp_path):
    with subprocess.Popen(["sleep", "30"]) as other:
        held_elsewhere(tmp_path, pid=other.pid, process_start=process_start(other.pid) - 1)
        claim_run_dir(tmp_path)
        other.kill()
    assert [claim.pid for claim in claims(tmp_path)] == [os.getpid()]


def test_another_hosts_owner_holds_while_its_heartbeat_is_fresh(tmp_path):
    stale = time.time() - STALE_AFTER_S - 1
    held_elsewhere(tmp_path, host="node-b", pid=4242, heartbeat=time.time() - 5)
    with pytest.raises(RunDirectoryInUse, match="pid 4242 on host node-b .* last seen 5 s ago"):
        claim_run_dir(tmp_path)

    (tmp_path / "owner" / "claim_00000001.json").unlink()
    held_elsewhere(tmp_path.joinpath("silent"), host="node-b", pid=4242, heartbeat=stale)
    claim_run_dir(tmp_path / "silent")
    assert [claim.host for claim in claims(tmp_path / "silent")] == [socket.gethostname()]


def test_a_released_claim_and_an_earlier_attempts_claim_are_taken_over(tmp_path, monkeypatch):
    held_elsewhere(tmp_path / "released", host="node-b", released=True)
    claim_run_dir(tmp_path / "released")

    # A SLURM job requeued onto another node, after its first attempt was killed on node-b.
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    held_elsewhere(tmp_path / "requeued", host="node-b", attempts={"slurm": ["42", 0]})
    claim_run_dir(tmp_path / "requeued")
    # Another job, or the same attempt, is another run.
    for attempts in ({"slurm": ["41", 0]}, {"slurm": ["42", 1]}):
        held_elsewhere(tmp_path / attempts["slurm"][0] / "x", host="node-b", attempts=attempts)
        with pytest.raises(RunDirectoryInUse, match="node-b"):
            claim_run_dir(tmp_path / attempts["slurm"][0] / "x")


def test_only_global_rank_0_claims(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    claim_run_dir(tmp_path)
    assert not (tmp_path / "owner").exists()


@pytest.mark.multiprocess
def test_of_starters_racing_for_a_fresh_directory_exactly_one_wins(tmp_path):
    go = tmp_path / "go"
    race = (
        "import sys, time; from pathlib import Path; from train.ownership import claim_run_dir\n"
        f"print('ready', flush=True)\nwhile not Path({str(go)!r}).exists(): time.sleep(0.001)\n"
        "claim_run_dir(Path(sys.argv[1])); print('claimed', flush=True); time.sleep(60)"
    )
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", race, str(tmp_path / "run")],
            cwd=ROOT,
            env=process_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        assert all(starter.stdout.readline() == "ready\n" for starter in starters)
        go.touch()
        winners = [starter for starter in starters if starter.stdout.readline() == "claimed\n"]
        losers = [starter for starter in starters if starter not in winners]
        errors = [loser.communicate(timeout=60)[1].strip().splitlines()[-1] for loser in losers]
    finally:
        for starter in starters:
            starter.kill()
            starter.wait()
    print(f"\nwinner pid {[w.pid for w in winners]}; the others: {errors}")
    assert len(winners) == 1
    assert all(f"pid {winners[0].pid} on host" in error for error in errors)


@pytest.mark.slow
def test_a_second_training_start_is_refused_and_a_start_after_a_kill_9_proceeds(
    demo_shards, tmp_path
):
    args = [
        f"data.shards={demo_shards}", f"train.run_dir={tmp_path}", "train.log_every=1",
        "train.checkpoint_every=1000", "train.sample_prompts=[]", "logger=none",
    ]  # fmt: skip
    train = [sys.executable, "-m", "train", *args]
    first = subprocess.Popen(
        [*train, "train.steps=500"], cwd=ROOT, env=process_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not metrics(tmp_path):
            assert first.poll() is None and time.monotonic() < deadline, "no step 1 logged"
            time.sleep(0.2)
        started = time.monotonic()
        second = subprocess.run(
            [*train, "train.steps=2"], cwd=ROOT, env=process_env(), capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        refusal = [line for line in second.stderr.splitlines() if "is in use by" in line]
        print(f"\nsecond start refused after {time.monotonic() - started:.1f} s: {refusal}")
        assert second.returncode != 0 and first.poll() is None
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
    finally:
        first.kill()
        first.wait()
    after_crash = subprocess.run(
        [*train, "train.steps=2"], cwd=ROOT, env=process_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert after_crash.returncode == 0, after_crash.stderr[-3000:]
    assert claims(tmp_path)[-1].released

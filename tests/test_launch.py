"""Launching real runs of the tiny DiT: a local Hydra sweep, two network namespaces as two
torchrun nodes, and a real single-node SLURM cluster started for this module (preemption with
USR1, requeue and resume; a sweep through the submitit launcher); the sbatch script of a
16 x 8 GPU job."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import ROOT, metrics, process_env, skip_unless_ci
from slurm_cluster import SlurmCluster, SlurmUnavailable

from launch.command import Run
from launch.config import load_launcher
from launch.slurm import sbatch_script

STEPS = 4


def run_overrides(shards: Path, run_dir: Path | None, *extra: str) -> list[str]:
    values = {
        "data.shards": shards,
        "train.steps": STEPS,
        "train.log_every": 1,
        "train.checkpoint_every": 100,  # only the final (or preemption) checkpoint
        "train.sample_prompts": "[]",
        "optim.warmup_steps": 2,
        "logger": "none",
    }
    if run_dir is not None:
        values["train.run_dir"] = run_dir
    values |= dict(item.split("=", 1) for item in extra)
    return [f"{key}={value}" for key, value in values.items()]


def launch(module: str, *args: str, env: dict | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env or process_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def complete_checkpoint(run_dir: Path, step: int) -> Path:
    """The step's checkpoint, asserted complete (its manifest is the last file written)."""
    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (checkpoint / "manifest.json").is_file(), f"{checkpoint} is incomplete"
    return checkpoint


def logged_steps(run_dir: Path) -> list[int]:
    return [line["step"] for line in metrics(run_dir)]


def test_dry_run_script_for_16_nodes_of_8_gpus(tmp_path):
    result = launch(
        "launch.slurm", "--dry-run", "experiment=demo", "parallel=fsdp",
        f"train.run_dir={tmp_path}", "launcher.nodes=16", "launcher.gpus_per_node=8",
        "launcher.cpus_per_node=96", "launcher.partition=gpu", "launcher.account=video",
        "launcher.qos=high", "launcher.constraint=h100", "launcher.exclusive=true",
        "launcher.time=48:00:00", "launcher.signal_grace_s=600", "launcher.extra_sbatch=['--mem=0']",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = result.stdout
    print(f"\n{script}")
    assert script.startswith("#!/bin/bash\n")
    sbatch = [line.removeprefix("#SBATCH ") for line in script.splitlines() if "#SBATCH" in line]
    assert sbatch == [
        "--job-name=demo", "--nodes=16", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--cpus-per-task=96", "--time=48:00:00", "--partition=gpu", "--account=video",
        "--qos=high", "--constraint=h100", "--exclusive", "--signal=USR1@600", "--requeue",
        "--open-mode=append", f"--output={tmp_path}/slurm/%j.out",
        f"--error={tmp_path}/slurm/%j.err", f"--chdir={ROOT}", "--mem=0",
    ]  # fmt: skip
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "export OMP_NUM_THREADS=12" in script  # 96 CPUs / 8 processes
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    assert "trap '' USR1" in script and "srun --kill-on-bad-exit=1 bash -c run_node" in script
    for option in (
        "--nnodes=16", "--nproc_per_node=8", "--rdzv_backend=c10d",
        '"--rdzv_endpoint=$HEAD_NODE:29500"', '"--rdzv_id=$SLURM_JOB_ID"',
        f"train.run_dir={tmp_path}", "experiment=demo parallel=fsdp",
    ):  # fmt: skip
        assert option in script
    assert f"if [ -f {tmp_path}/PREEMPTED ]; then" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_misspelt_launcher_key_and_bad_values_are_named():
    with pytest.raises(ValueError, match="gpus_per_nod"):
        load_launcher("slurm", ["launcher.gpus_per_nod=8"])
    with pytest.raises(ValueError, match="launcher.node_rank=2"):
        load_launcher("local", ["launcher.nodes=2", "launcher.node_rank=2"])
    with pytest.raises(ValueError, match="launcher=lsf"):
        load_launcher("local", ["launcher=lsf"])


@pytest.mark.slow
def test_local_sweep_runs_one_config_after_another_each_in_its_own_dir(demo_shards, tmp_path):
    sweep = tmp_path / "sweep"
    result = launch(
        "train", "-m", f"hydra.sweep.dir={sweep}", *run_overrides(demo_shards, None),
        "train.steps=2", "optim.lr=1e-3,2e-3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    for job, lr in ((0, "0.001"), (1, "0.002")):
        assert logged_steps(sweep / str(job)) == [1, 2]
        assert f"lr: {lr}" in (sweep / str(job) / "config.yaml").read_text()


def child_pids(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return sorted(int(child) for child in children.stdout.split())


def is_running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to read its exit status."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.multiprocess
def test_kill_9_of_the_launcher_group_leaves_no_worker_running(demo_shards, tmp_path):
    args = run_overrides(demo_shards, tmp_path, "parallel=fsdp", "train.steps=500")
    launcher = ["launcher.procs_per_node=2", "launcher.threads_per_proc=1"]
    with open(tmp_path / "launcher.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "launch.local", *launcher, *args],
            cwd=ROOT, env=process_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # the launcher and its torchrun agent: one process group
        )  # fmt: skip
    wait_for(lambda: logged_steps(tmp_path), "step 1", timeout=240)
    (agent,) = child_pids(process.pid)
    workers = child_pids(agent)
    assert len(workers) == 2, workers
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = time.monotonic()
    try:
        while any(map(is_running, workers)) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        running = [pid for pid in workers if is_running(pid)]
        print(f"\nworkers {workers} of agent {agent}: still running 10 s after the kill: {running}")
        assert not running, f"workers {running} outlived their torchrun agent"
    finally:
        for pid in workers:  # a failed run must not go on training
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_whose_agent_is_already_gone_stops_at_once(tmp_path):
    worker = "from train.signals import die_with_agent; die_with_agent(); print('still running')"
    out = tmp_path / "worker.out"
    # The outer shell exits at once: the worker starts as an orphan, as it would if its agent
    # were killed between starting it and its prctl.
    orphan = f'(sleep 1; exec {sys.executable} -c "{worker}" > {out} 2>&1) &'
    subprocess.run(["bash", "-c", orphan], env=process_env(TORCHELASTIC_RUN_ID="test"), check=True)
    wait_for(lambda: "\n" in (out.read_text() if out.exists() else ""), "the worker's output", 60)
    print(f"\norphaned worker: {out.read_text()}")
    assert "the torchrun agent that started this worker is gone" in out.read_text()
    assert "still running" not in out.read_text()


# --- two network namespaces as two nodes -----------------------------------------------------


@pytest.fixture
def two_nodes():
    """Two network namespaces joined by a veth pair: [(namespace, address, interface)] x 2."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        skip_unless_ci("network namespaces need root and iproute2's `ip`")
    tag = f"{os.getpid() % 100000}"
    nodes = [
        (f"tsr{tag}n{i}", f"10.231.{os.getpid() % 250}.{i + 1}", f"tsr{tag}v{i}") for i in (0, 1)
    ]
    (ns0, _, if0), (ns1, _, if1) = nodes

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        for namespace, _, _ in nodes:
            ip("netns", "add", namespace)
        ip("link", "add", if0, "type", "veth", "peer", "name", if1)
        for namespace, address, interface in nodes:
            ip("link", "set", interface, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", namespace, "link", "set", interface, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
        yield nodes
    finally:
        for namespace, _, _ in nodes:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


@pytest.mark.multiprocess
def test_two_node_fsdp_through_launch_local(two_nodes, demo_shards, tmp_path):
    endpoint = f"{two_nodes[0][1]}:29500"
    agents = []
    for rank, (namespace, address, interface) in enumerate(two_nodes):
        launcher = [
            "launcher.nodes=2", f"launcher.node_rank={rank}", f"launcher.rdzv_endpoint={endpoint}",
            f"launcher.local_addr={address}", f"launcher.socket_ifname={interface}",
            "launcher.threads_per_proc=1",
        ]  # fmt: skip
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "launch.local"]
        command += [*launcher, *run_overrides(demo_shards, tmp_path, "parallel=fsdp")]
        agents.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=process_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    for rank, (agent, output) in enumerate(zip(agents, outputs, strict=True)):
        assert agent.returncode == 0, f"node {rank}:\n{output[-4000:]}"
        printed = output.splitlines()[0]
        print(f"\nnode {rank} ran: {printed}")
        assert printed.startswith("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 GLOO_SOCKET_IFNAME=")
        for option in ("--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}"):
            assert option in printed
        rank_logs = list((tmp_path / "logs" / f"node{rank}").rglob("stdout.log"))
        assert len(rank_logs) == 1, rank_logs  # one process per node, one log
    assert "fsdp: world 2 = dp_replicate 1 x dp_shard 2" in outputs[0]
    assert [line["step"] for line in metrics(tmp_path)] == list(range(1, STEPS + 1))
    checkpoint = complete_checkpoint(tmp_path, STEPS)
    assert (tmp_path / "checkpoints" / "latest").read_text() == checkpoint.name
    assert len(list((checkpoint / "dcp").glob("*.distcp"))) == 2  # a shard from each node


# --- a real single-node SLURM cluster ----------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as why:
        skip_unless_ci(f"SLURM cannot be installed on this machine: {why}")
    yield cluster
    cluster.stop()


def wait_for(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} not seen in {timeout} s")


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_the_rerun_resumes(slurm, demo_shards, tmp_path):
    steps = 8
    args = run_overrides(demo_shards, tmp_path, "parallel=fsdp", f"train.steps={steps}")
    launcher = ["launcher.procs_per_node=2", "launcher.cpus_per_node=2", "launcher.time=00:15:00"]
    started = time.monotonic()
    submitted = launch("launch.slurm", *launcher, *args, env=process_env(**slurm.env))
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    assert (tmp_path / "slurm" / "job.sbatch").is_file()

    wait_for(lambda: len(logged_steps(tmp_path)) >= 2, "step 2", timeout=180)
    slurm.run("scancel", "--signal=USR1", job_id)
    signalled = time.monotonic()
    wait_for(lambda: slurm.job(job_id).get("Restarts") == "1", "the requeue", timeout=120)
    requeued = time.monotonic()
    wait_for(lambda: slurm.job(job_id).get("JobState") == "COMPLETED", "the rerun's end", 240)

    log = (tmp_path / "slurm" / f"{job_id}.out").read_text()
    stopped = int(re.search(r"stopping at step (\d+) on SIGUSR1", log).group(1))
    print(
        f"\njob {job_id}: USR1 {signalled - started:.0f} s after submission, checkpoint at step "
        f"{stopped}, requeued {requeued - signalled:.0f} s later, done after "
        f"{time.monotonic() - started:.0f} s in all"
    )
    complete_checkpoint(tmp_path, stopped)
    assert "preempted: checkpoint written, requeueing" in log
    assert f"resumed from step {stopped}" in log and "attempt 1" in log
    assert logged_steps(tmp_path) == list(range(1, steps + 1))  # no step lost or repeated
    assert (tmp_path / "checkpoints" / "latest").read_text() == complete_checkpoint(
        tmp_path, steps
    ).name
    for attempt in (0, 1):  # one log per rank and attempt
        rank_logs = list(
            (tmp_path / "logs").glob(f"job{job_id}-attempt{attempt}/*/*/*/*/stdout.log")
        )
        assert len(rank_logs) == 2, rank_logs


@pytest.mark.slurm
def test_sweep_through_the_submitit_launcher(slurm, demo_shards, tmp_path):
    sweep = tmp_path / "sweep"
    hydra_launcher = [
        "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={sweep}",
        "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
    ]  # fmt: skip
    started = time.monotonic()
    result = launch(
        "train", "-m", *hydra_launcher, *run_overrides(demo_shards, None),
        "optim.lr=1e-3,2e-3", env=process_env(**slurm.env), timeout=300,
    )  # fmt: skip
    print(f"\nsweep of 2 SLURM jobs: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stderr[-4000:]
    for job, lr in ((0, "0.001"), (1, "0.002")):
        run_dir = sweep / str(job)
        assert logged_steps(run_dir) == list(range(1, STEPS + 1))
        complete_checkpoint(run_dir, STEPS)
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()


def test_threads_are_shared_out_at_run_time_without_cpus_per_node(tmp_path):
    config = load_launcher("slurm", ["launcher.procs_per_node=4"])
    script = sbatch_script(config, Run("demo", tmp_path, [f"train.run_dir={tmp_path}"]))
    export = next(line for line in script.splitlines() if "OMP_NUM_THREADS=" in line)
    for cpus, threads in ((16, "4"), (2, "1")):
        shell = subprocess.run(
            ["bash", "-c", f"{export}; echo $OMP_NUM_THREADS"],
            env={"SLURM_CPUS_ON_NODE": str(cpus)}, capture_output=True, text=True,
        )  # fmt: skip
        assert shell.stdout.strip() == threads, (export, shell.stderr)

"""The pieces every launcher shares: the run a command line describes, the torchrun command that
starts it on one node, and the environment its processes get.

The run is resolved by `python -m train ... --cfg job` in a child process, so the launcher checks
the run's config (a misspelt key fails here, before any job is submitted) without importing train/.
Every rank is then given `train.run_dir` explicitly: all ranks of a run share one directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from launch.config import LauncherConfig

# Left in the run dir by rank 0 of a run that checkpointed and stopped on a signal (the name
# train/signals.py writes; torchrun's own exit status does not tell a preemption from a crash).
PREEMPTED_MARKER = "PREEMPTED"


@dataclass(frozen=True)
class Run:
    name: str
    run_dir: Path  # absolute
    overrides: list[str]  # the run's Hydra overrides, run_dir pinned


def resolve_run(overrides: list[str]) -> Run:
    """The run's name and directory, as `python -m train` composes them."""
    result = subprocess.run(
        [sys.executable, "-m", "train", *overrides, "--cfg", "job", "--resolve"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"the run's config does not compose:\n{result.stderr.strip()}")
    job = OmegaConf.create(result.stdout)
    run_dir = Path(job.train.run_dir).resolve()
    pinned = [o for o in overrides if not o.startswith("train.run_dir=")]
    return Run(job.name, run_dir, [*pinned, f"train.run_dir={run_dir}"])


def process_threads(config: LauncherConfig, cpus: int | None = None) -> int:
    """OMP/MKL threads per process: the CPUs at hand shared out, at least one."""
    if config.threads_per_proc > 0:
        return config.threads_per_proc
    return max(1, (cpus or os.cpu_count() or 1) // config.procs)


def process_env(config: LauncherConfig, threads: int | str) -> dict[str, str]:
    """What the launcher adds to the environment of torchrun and its workers."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if config.socket_ifname:
        env["GLOO_SOCKET_IFNAME"] = config.socket_ifname
    if config.gpus_per_node > 0:
        # Fail a collective that hangs instead of blocking until the job's time limit.
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        env["NCCL_DEBUG"] = os.environ.get("NCCL_DEBUG", "WARN")
        if config.socket_ifname:
            env["NCCL_SOCKET_IFNAME"] = config.socket_ifname
    return env


def torchrun_args(config: LauncherConfig, rdzv_endpoint: str, run_id: str) -> list[str]:
    """torchrun's options shared by every node, up to (not including) the script. One node
    rendezvouses on its own; several meet at node 0's c10d store."""
    args = [f"--nproc_per_node={config.procs}", f"--max_restarts={config.max_restarts}"]
    if config.nodes == 1:
        return ["--standalone", *args]
    return [
        f"--nnodes={config.nodes}",
        *args,
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={rdzv_endpoint}",
        f"--rdzv_id={run_id}",
    ]

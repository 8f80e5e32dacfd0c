"""Starting real training processes from tests: torchrun on free local ports, plain runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    *args: str, nproc: int = 2, torchrun_args: tuple[str, ...] = (), standalone: bool = False
) -> list[str]:
    """torchrun on this machine: a static rendezvous on a free port, or with `standalone` the
    c10d rendezvous that `launch.local` uses on one node (a fresh round for every restart)."""
    rendezvous = (
        ["--standalone"]
        if standalone
        else ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        *rendezvous,
        *torchrun_args,
        *args,
    ]


def process_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def run_checked(command: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=ROOT, env=process_env(**env), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
    return result


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_checked(torchrun_command(*args, nproc=nproc), timeout)


def launch_training(
    *overrides: str, nproc: int = 2, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`python -m train` on `nproc` ranks (a plain process when nproc is 1)."""
    if nproc == 1:
        return run_checked([sys.executable, "-m", "train", *overrides], timeout)
    return torchrun("-m", "train", *overrides, nproc=nproc, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> list[float]:
    return [line["train/loss"] for line in metrics(run_dir)]

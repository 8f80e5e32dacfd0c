"""Starting real training processes from tests: torchrun on one node, plain runs; and
what tests of runs share: their metrics, a replayable seed, setup that CI must not skip."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# Native-size packing on the demo data (conf/experiment/demo_packed.yaml's settings), with
# every frame-conditioning mode, so that packs hold given frames too.
PACKED = (
    "packing.enabled=true",
    "packing.sequence_tokens=480",
    "packing.max_tokens_per_sample=240",
    "packing.max_frames=17",
    "conditioning=mixed",
)


@contextmanager
def reserved_ports(count: int) -> Iterator[list[int]]:
    """`count` free local ports, held bound until the block ends, so that no other process's
    bind to port 0 takes one while the server they are meant for starts. The server binds them
    too: Linux allows that where both sockets set SO_REUSEADDR and neither listens yet."""
    with ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        yield ports


def torchrun_command(*args: str, nproc: int = 2, torchrun_args: tuple[str, ...] = ()) -> list[str]:
    """torchrun on this machine with the c10d rendezvous that `launch.local` uses on one node:
    its store binds a port of the system's choosing (no port chosen here that another process
    could take first), and every restart is a fresh round."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
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
    """The run's logged steps; [] before its first. Only whole lines count: a run that is still
    training may be halfway through writing the last one."""
    path = run_dir / "metrics.jsonl"
    whole_lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in whole_lines]


def step_losses(run_dir: Path) -> list[float]:
    return [line["train/loss"] for line in metrics(run_dir)]


def assert_runs_match_step_by_step(title: str, runs: dict[str, Path], steps: int) -> None:
    """Print the runs' losses side by side. The first run is the reference: it logs `steps`
    steps whose last third is below its first, and every other run matches it step by step
    (relative 1e-4)."""
    table = {name: step_losses(run_dir) for name, run_dir in runs.items()}
    print(f"\n{title}\nstep " + "".join(f"{name:>14}" for name in table))
    for step in range(steps):
        print(f"{step + 1:4d} " + "".join(f"{losses[step]:14.8f}" for losses in table.values()))
    reference_name, *others = table
    reference = torch.tensor(table[reference_name], dtype=torch.float64)
    third = max(steps // 3, 1)
    assert len(reference) == steps and reference[-third:].mean() < reference[:third].mean()
    for name in others:
        relative = (torch.tensor(table[name], dtype=torch.float64) - reference).abs() / reference
        assert relative.max() < 1e-4, (
            f"{title} {name}: worst relative loss difference {relative.max()}"
        )


def random_seed() -> int:
    """A seed for a test's random choices, new each run; TESSERA_TEST_SEED=<seed> replays one.
    Tests print it and name it in their assertion messages."""
    return int(os.environ.get("TESSERA_TEST_SEED") or secrets.randbelow(2**32))


def skip_unless_ci(reason: str) -> None:
    """Skip a test whose setup this machine cannot provide, except under CI=true, where a
    missing cluster or tool is a failure, not a silent skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)

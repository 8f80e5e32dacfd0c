"""`python -m launch.local [launcher.key=value ...] [run overrides ...]`: torchrun on this node.

One node: `launcher.procs_per_node` (or `launcher.gpus_per_node`) processes. Several nodes: run
the same command on each with `launcher.nodes`, its own `launcher.node_rank` and node 0's
`launcher.rdzv_endpoint`; node 0 hosts the c10d rendezvous. The exact command is printed first.
Each rank's output is also written under <run_dir>/logs/node<rank>/.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from launch.command import Run, process_env, process_threads, resolve_run, torchrun_args
from launch.config import LauncherConfig, load_launcher, split_args


def local_command(config: LauncherConfig, run: Run) -> list[str]:
    args = torchrun_args(config, config.rdzv_endpoint, run.name)
    if config.nodes > 1:
        # Node 0 serves the rendezvous store even when its hostname is not the endpoint's host.
        args += [
            f"--node_rank={config.node_rank}",
            f"--rdzv_conf=is_host={int(config.node_rank == 0)}",
        ]
    if config.local_addr:
        args.append(f"--local_addr={config.local_addr}")
    log_dir = run.run_dir / "logs" / f"node{config.node_rank}"
    args += [f"--log_dir={log_dir}", "--tee=3"]
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "train", *run.overrides]


def main(argv: list[str]) -> int:
    launcher_args, run_args = split_args(argv)
    config = load_launcher("local", launcher_args)
    run = resolve_run(run_args)
    env = process_env(config, process_threads(config))
    command = local_command(config, run)
    prefix = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    print(f"{prefix} {shlex.join(command)}", flush=True)
    return subprocess.run(command, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

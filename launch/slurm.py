"""`python -m launch.slurm [--dry-run] [launcher.key=value ...] [run overrides ...]`: one sbatch job.

Writes <run_dir>/slurm/job.sbatch and submits it (`--dry-run` prints it instead). The job runs one
torchrun per node through srun, with the c10d rendezvous on the allocation's first node. SLURM
sends USR1 `launcher.signal_grace_s` before the time limit (or on `scancel --signal=USR1`): the
workers finish their step, checkpoint and leave <run_dir>/PREEMPTED; the script then requeues the
job, and the rerun resumes from the latest checkpoint (`train.resume=auto`). Output is appended
across requeues, and torchrun writes one log per rank under <run_dir>/logs/.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from launch.command import (
    PREEMPTED_MARKER,
    Run,
    process_env,
    process_threads,
    resolve_run,
    torchrun_args,
)
from launch.config import LauncherConfig, load_launcher, split_args


def sbatch_options(config: LauncherConfig, run: Run) -> list[str]:
    slurm_dir = run.run_dir / "slurm"
    options = [
        f"--job-name={config.job_name or run.name}",
        f"--nodes={config.nodes}",
        "--ntasks-per-node=1",  # one torchrun agent per node starts the node's workers
    ]
    if config.gpus_per_node > 0:
        options.append(f"--gpus-per-node={config.gpus_per_node}")
    if config.cpus_per_node > 0:
        options.append(f"--cpus-per-task={config.cpus_per_node}")
    options.append(f"--time={config.time}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(config, key):
            options.append(f"--{key}={getattr(config, key)}")
    if config.exclusive:
        options.append("--exclusive")
    options += [
        f"--signal=USR1@{config.signal_grace_s}",
        "--requeue" if config.requeue else "--no-requeue",
        "--open-mode=append",  # a requeued run adds to the same log files
        f"--output={slurm_dir}/%j.out",
        f"--error={slurm_dir}/%j.err",
        f"--chdir={Path.cwd()}",
    ]
    return options + list(config.extra_sbatch)


def node_command(config: LauncherConfig, run: Run) -> list[str]:
    """One node's torchrun; $SLURM_NODEID, $HEAD_NODE and $SLURM_JOB_ID are expanded per node."""
    args = torchrun_args(config, f"$HEAD_NODE:{config.rdzv_port}", "$SLURM_JOB_ID")
    if config.nodes > 1:
        args += ["--node_rank=$SLURM_NODEID", "--rdzv_conf=is_host=$(( SLURM_NODEID == 0 ))"]
    args += [
        f"--log_dir={run.run_dir}/logs/job$SLURM_JOB_ID-attempt${{SLURM_RESTART_COUNT:-0}}"
        "/node$SLURM_NODEID",
        "--tee=3",
    ]
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _shell_word(word: str) -> str:
    """Quoted for bash, except words holding $: those are double-quoted so they expand."""
    return f'"{word}"' if "$" in word else shlex.quote(word)


def _shell_words(words: list[str]) -> str:
    return " ".join(_shell_word(w) for w in words)


def _threads(config: LauncherConfig) -> int | str:
    """Threads per process: fixed when the CPUs are asked for, else shared out at run time."""
    if config.threads_per_proc or config.cpus_per_node:
        return process_threads(config, config.cpus_per_node)
    share = f"SLURM_CPUS_ON_NODE / {config.procs}"
    return f"$(( {share} > 0 ? {share} : 1 ))"


def sbatch_script(config: LauncherConfig, run: Run) -> str:
    env = process_env(config, _threads(config))
    exports = "\n".join(f"export {k}={_shell_word(str(v))}" for k, v in env.items())
    marker = shlex.quote(str(run.run_dir / PREEMPTED_MARKER))
    torchrun = _shell_words(node_command(config, run))
    train = " ".join(shlex.quote(w) for w in ["-m", "train", *run.overrides])
    requeue = (
        f"if [ -f {marker} ]; then\n"
        '  echo "preempted: checkpoint written, requeueing job $SLURM_JOB_ID"\n'
        '  scontrol requeue "$SLURM_JOB_ID"\n'
        "  exit 0\n"
        "fi\n"
        if config.requeue
        else ""
    )
    return (
        "#!/bin/bash\n"
        f"# Written by `python -m launch.slurm` for the run {run.name} ({run.run_dir}).\n"
        + "".join(f"#SBATCH {option}\n" for option in sbatch_options(config, run))
        + "\n"
        "set -u\n"
        f"{exports}\n"
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        "export HEAD_NODE\n"
        'echo "job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST,'
        f' head node $HEAD_NODE, $(date -u)"\n'
        f"rm -f {marker}\n"
        "\n"
        "# One torchrun per node. It ignores USR1, which only its workers handle (they checkpoint\n"
        "# and stop); without this the signal's default action would kill the agent first.\n"
        "run_node() {\n"
        "  trap '' USR1\n"
        f"  exec {torchrun} \\\n    {train}\n"
        "}\n"
        "export -f run_node\n"
        "srun --kill-on-bad-exit=1 bash -c run_node\n"
        "status=$?\n"
        "\n"
        f"{requeue}"
        'echo "torchrun exited with $status, $(date -u)"\n'
        "exit $status\n"
    )


def submit(script_path: Path) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", str(script_path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"sbatch {script_path} failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    launcher_args, run_args = split_args([a for a in argv if a != "--dry-run"])
    config = load_launcher("slurm", launcher_args)
    run = resolve_run(run_args)
    script = sbatch_script(config, run)
    if dry_run:
        print(script, end="")
        return 0
    script_path = run.run_dir / "slurm" / "job.sbatch"
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    job_id = submit(script_path)
    print(f"submitted job {job_id}: {script_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""How long a checkpoint stops training: blocking against asynchronous saves.

    python -m bench.checkpoint [--size medium] [--ranks 1] [--saves 3]

The DiT of `--size` with its AdamW state (after one step, so the moments exist) and an EMA goes
through the trainer's own Checkpointer and stores (train/checkpoint.py) `--saves` times each
way, into a temporary folder: in one process (`--ranks 1`), or sharded by FSDP2 over
`--ranks` gloo ranks that torchrun starts. Reported, per way: the stall (how long `save` keeps
the training thread, the slowest rank's), the time until the checkpoint is committed (`save`
and then `wait`), and the checkpoint's size. Goal: the asynchronous stall <= 0.1x the blocking
save.

Also reported: `python_speed_while_writing`, how fast the training thread runs Python while
the background writer writes, as a share of its speed with no save in flight. The writer is a
thread; this is what its share of the GIL costs training (1.0: nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data.plan import DataState
from model.dit import DiT, dit_config
from train.checkpoint import Checkpointer, checkpoint_stores
from train.config import OptimConfig, ParallelConfig
from train.ema import EMA
from train.parallel import ParallelDims, build_engine
from train.runtime import init_runtime, launch_env
from train.state import DataPosition
from train.trainer import Progress

CHANNELS, TEXT_DIM = 4, 384


def trained_state(size: str, backend: str):
    """The engine (model and optimizer after one step) and the EMA of a `size` DiT."""
    runtime = init_runtime(distributed=backend != "none")
    dims = ParallelDims.resolve(ParallelConfig(backend=backend), runtime.world_size, runtime.rank)
    dims.build_mesh(runtime.device.type)
    model = DiT(dit_config(size), CHANNELS, TEXT_DIM)
    engine = build_engine(model, ParallelConfig(backend=backend), OptimConfig(), dims, 1, 10)
    x = torch.randn(1, CHANNELS, 1, 16, 16)
    text, mask = torch.randn(1, 8, TEXT_DIM), torch.ones(1, 8, dtype=torch.bool)
    engine.micro_step(engine.model(x, torch.rand(1), text, mask).square().mean())
    engine.finish_step()
    return engine, EMA(engine, decay=0.999), dims


def python_speed(busy, seconds: float = 1.0) -> float:
    """Iterations per second of a plain Python loop on this thread: while `busy()` holds, or
    for `seconds` when `busy` is None (the loop's body is the same either way)."""
    end = time.perf_counter() + seconds
    busy = busy or (lambda: time.perf_counter() < end)
    count, start = 0, time.perf_counter()
    while busy():
        for _ in range(1000):
            count += 1
    return count / (time.perf_counter() - start)


def slowest(seconds: float) -> float:
    if not dist.is_initialized():
        return seconds
    value = torch.tensor(seconds)
    dist.all_reduce(value, dist.ReduceOp.MAX)
    return value.item()


def timed_saves(checkpointer: Checkpointer, saves: int) -> dict:
    stalls, committed, speeds = [], [], []
    for step in range(1, saves + 1):
        idle = python_speed(None)
        start = time.perf_counter()
        checkpointer.save(step)
        stalls.append(slowest(time.perf_counter() - start))
        if checkpointer.asynchronous:
            speeds.append(python_speed(lambda: checkpointer.writing) / idle)
        checkpointer.wait()
        committed.append(slowest(time.perf_counter() - start))
    folder = checkpointer.complete_checkpoints()[-1]
    result = {
        "stall_s": round(statistics.median(stalls), 3),
        "committed_s": round(statistics.median(committed), 3),
        "gib": round(sum(f.stat().st_size for f in folder.rglob("*")) / 2**30, 2),
    }
    if speeds:
        result["python_speed_while_writing"] = round(statistics.median(speeds), 3)
    return result


def measure(size: str, backend: str, saves: int, root: Path) -> dict:
    engine, ema, dims = trained_state(size, backend)
    position = DataPosition(DataState(seed=0, epoch=0, consumed_samples=0))
    stores = checkpoint_stores(engine, ema, Progress(), position, dims.layout(), {})
    report = {"size": size, "backend": backend, "ranks": dims.world_size}
    for way, asynchronous in (("blocking", False), ("asynchronous", True)):
        checkpointer = Checkpointer(root / way, stores, 1, 0, asynchronous)
        report[way] = timed_saves(checkpointer, saves)
    report["stall_ratio"] = round(
        report["asynchronous"]["stall_s"] / report["blocking"]["stall_s"], 3
    )
    return report


def launch(args: argparse.Namespace, root: Path) -> dict:
    """The measurement on `args.ranks` FSDP2 ranks; rank 0 writes its report under `root`."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={args.ranks}", "-m", "bench.checkpoint", "--size", args.size,
        "--saves", str(args.saves), "--worker", str(root),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, check=True, env=env)
    return json.loads((root / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report = measure(args.size, "fsdp", args.saves, args.worker)
        if launch_env()[0] == 0:
            (args.worker / "report.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.ranks == 1:
            report = measure(args.size, "none", args.saves, Path(tmp))
        else:
            report = launch(args, Path(tmp))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

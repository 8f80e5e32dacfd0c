"""How long a checkpoint stops training: blocking against asynchronous saves.

    python -m bench.checkpoint [--size medium] [--saves 3]

In one process, the DiT of `--size` with its AdamW state (after one step, so the moments
exist) and an EMA goes through the trainer's own Checkpointer and stores (train/checkpoint.py)
`--saves` times each way, into a temporary folder. Reported, per way: the stall (how long
`save` keeps the training thread), the time until the checkpoint is committed (`save` and then
`wait`), and the checkpoint's size. Goal: the asynchronous stall <= 0.1x the blocking save.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data.plan import DataState
from model.dit import DiT, dit_config
from train.checkpoint import Checkpointer, checkpoint_stores
from train.config import OptimConfig, ParallelConfig
from train.ema import EMA
from train.parallel import ParallelDims, build_engine
from train.state import DataPosition
from train.trainer import Progress

CHANNELS, TEXT_DIM = 4, 384


def trained_state(size: str):
    """The engine (model and optimizer after one step) and the EMA of a `size` DiT."""
    parallel = ParallelConfig(backend="none")
    dims = ParallelDims.resolve(parallel, world_size=1)
    model = DiT(dit_config(size), CHANNELS, TEXT_DIM)
    engine = build_engine(model, parallel, OptimConfig(), dims, 1, 10)
    x = torch.randn(1, CHANNELS, 1, 16, 16)
    text, mask = torch.randn(1, 8, TEXT_DIM), torch.ones(1, 8, dtype=torch.bool)
    engine.micro_step(engine.model(x, torch.rand(1), text, mask).square().mean())
    engine.finish_step()
    return engine, EMA(engine, decay=0.999), dims


def timed_saves(checkpointer: Checkpointer, saves: int) -> tuple[list[float], list[float]]:
    stalls, committed = [], []
    for step in range(1, saves + 1):
        start = time.perf_counter()
        checkpointer.save(step)
        stalls.append(time.perf_counter() - start)
        checkpointer.wait()
        committed.append(time.perf_counter() - start)
    return stalls, committed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium")
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    engine, ema, dims = trained_state(args.size)
    position = DataPosition(DataState(seed=0, epoch=0, consumed_samples=0))
    stores = checkpoint_stores(engine, ema, Progress(), position, dims.layout(), {})
    report = {"size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        for way, asynchronous in (("blocking", False), ("asynchronous", True)):
            checkpointer = Checkpointer(Path(tmp) / way, stores, 1, 0, asynchronous)
            stalls, committed = timed_saves(checkpointer, args.saves)
            folder = checkpointer.complete_checkpoints()[-1]
            report[way] = {
                "stall_s": round(statistics.median(stalls), 3),
                "committed_s": round(statistics.median(committed), 3),
                "gib": round(sum(f.stat().st_size for f in folder.rglob("*")) / 2**30, 2),
            }
    report["stall_ratio"] = round(
        report["asynchronous"]["stall_s"] / report["blocking"]["stall_s"], 3
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()

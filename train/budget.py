"""Training steps from a compute budget: the step count whose training FLOPs equal C.

A step's FLOPs depend on the buckets its batches come from: at an equal token budget a batch
of long clips pays more for attention than a batch of images, and batch sizes are rounded (with
packing, on the shapes of the samples in its packs).
The data plan is seeded and the same on any number of ranks, so the FLOPs of the first n
steps are known before training: this module walks the loader's own plan (rows of `dp_world`
batches, `grad_accum` rows a step, epoch after epoch) without reading anything, and picks the
step count whose cumulative FLOPs come closest to the budget.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator

import numpy as np

from data.buckets import Bucket
from data.pipeline import BatchStream, DataConfig, training_stream
from data.plan import DataPlan, DataState

log = logging.getLogger(__name__)


def step_flops(
    stream: BatchStream, sample_flops: Callable[[Bucket], float], grad_accum: int
) -> Iterator[float]:
    """Training FLOPs of every step in order, forever, summed over all ranks: `stream`, rank 0's,
    walks the rows every rank reads, and a row is its `dp_world` batches from rank 0's on."""

    plan, seed = stream.plan, stream.state.seed
    flops = np.array([sample_flops(b) for b in plan.buckets])

    def row_flops() -> Iterator[float]:
        for epoch, first, _ in stream.rows():
            row = range(first, first + stream.dp_world)
            yield float(sum(flops[plan.sample_buckets(seed, epoch, i)].sum() for i in row))

    rows = row_flops()
    while True:
        yield sum(itertools.islice(rows, grad_accum))


def steps_for_budget(flops_per_step: Iterator[float], budget: float) -> tuple[int, float]:
    """(steps, their FLOPs): the count whose cumulative FLOPs are closest to `budget`, at least 1."""
    total = 0.0
    for steps, flops in enumerate(flops_per_step, start=1):
        if total + flops >= budget:
            if steps > 1 and budget - total < total + flops - budget:
                return steps - 1, total
            return steps, total + flops
        total += flops
    raise AssertionError("flops_per_step ended")  # step_flops never ends


def budget_steps(
    budget: float,
    data: DataConfig,
    plan: DataPlan,
    sample_flops: Callable[[Bucket], float],
    grad_accum: int,
    dp_world: int,
) -> tuple[int, float]:
    """(steps, planned FLOPs) of a run of `budget` training FLOPs on the data of `data`."""
    stream = training_stream(data, plan, 0, dp_world, DataState(data.seed, 0, 0))
    steps, planned = steps_for_budget(step_flops(stream, sample_flops, grad_accum), budget)
    off = planned / budget - 1
    # One step's FLOPs bound the error: budgets of fewer than ~25 steps miss by more than 2%.
    (log.warning if abs(off) > 0.02 else log.info)(
        "train.budget_flops=%.4g: %d steps of %.4g FLOPs in all (%+.2f%%)",
        budget,
        steps,
        planned,
        100 * off,
    )
    return steps, planned

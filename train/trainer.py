"""The training loop, and nothing a backend could own.

One step draws `grad_accum` batches on every data-parallel rank, normalises the loss over every
sample of the global step (so a sample weighs the same whatever bucket, micro-batch or rank it
came in), lets the engine reduce, clip and apply the gradients, updates the EMA, and then logs,
evaluates, checkpoints and samples on their schedules.

Loss normalisation: engines average gradients over all ranks, so each rank scales its summed
per-sample losses by world_size / (samples in the global step). The average is then exactly the
gradient of the mean per-sample loss over the global batch. Averaging each rank's own mean first
would over-weight samples of ranks that drew small batches (big-resolution buckets).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data.pipeline import Batch
from train.checkpoint import Checkpointer
from train.config import Config
from train.evaluate import Evaluator
from train.logger import RunLogger
from train.objectives import Objective
from train.parallel import ParallelDims
from train.runtime import Runtime
from train.signals import Preempted, StopSignals

# What a step's batches count besides their samples, summed over them and the ranks.
BATCH_COUNTS = ("skipped", "read_retries", "read_wait_s")


@dataclass
class Progress:
    """The trainer's own state: a checkpoint component (train/state.py)."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps whose loss or gradients were NaN/Inf, applied nowhere
    bad_steps_in_a_row: int = 0
    flops_seen: float = 0.0  # analytic training FLOPs, counted like tokens_seen

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, state[name])


class Trainer:
    def __init__(
        self,
        *,
        config: Config,
        runtime: Runtime,
        dims: ParallelDims,
        engine,
        objective: Objective,
        batches: Iterator[Batch],
        checkpointer: Checkpointer,
        logger: RunLogger,
        ema=None,
        progress: Progress | None = None,
        sampler: Callable | None = None,
        peak_flops: float | None = None,
        stop_signals: StopSignals | None = None,
        evaluator: Evaluator | None = None,
    ):
        self.config = config
        self.runtime = runtime
        self.dims = dims
        self.engine = engine
        self.objective = objective
        self.batches = batches
        self.checkpointer = checkpointer
        self.logger = logger
        self.ema = ema
        self.progress = progress or Progress()
        self.sampler = sampler
        self.peak_flops = peak_flops
        self.stop_signals = stop_signals
        self.evaluator = evaluator  # called on every rank: the model's forward may be collective
        self.losses: list[float] = []

    def _draw(self) -> tuple[list[Batch], float]:
        start = time.perf_counter()
        batches = [next(self.batches) for _ in range(self.config.train.grad_accum)]
        return batches, time.perf_counter() - start

    def accumulate_gradients(self, batches: list[Batch]) -> dict[str, float]:
        """Forward and backward every micro-batch of a step; returns global sums."""
        num_samples = sum(len(b.keys) for b in batches)
        (global_samples,) = self.dims.sum_over_dp([num_samples])
        scale = self.dims.world_size / global_samples
        loss_sum, tokens, flops = 0.0, 0, 0.0
        for batch in batches:
            with self.runtime.autocast():
                loss = self.objective(self.engine.model, batch, self.runtime.device)
            self.engine.micro_step(loss.total * scale)
            loss_sum += loss.total.item()
            tokens += loss.tokens
            flops += loss.flops
        counts = [sum(getattr(b, name) for b in batches) for name in BATCH_COUNTS]
        totals = self.dims.sum_over_dp([loss_sum, tokens, flops, *counts])
        names = ["loss_sum", "tokens", "flops", *BATCH_COUNTS]
        return dict(zip(names, totals, strict=True)) | {"samples": global_samples}

    def train_step(self) -> dict[str, float]:
        batches, data_wait = self._draw()
        start = time.perf_counter()
        sums = self.accumulate_gradients(batches)
        grad_norm = self.engine.finish_step()
        p = self.progress
        finite = math.isfinite(sums["loss_sum"]) and math.isfinite(grad_norm)
        p.skipped_steps += not finite
        p.bad_steps_in_a_row = 0 if finite else p.bad_steps_in_a_row + 1
        if finite and self.ema is not None:
            self.ema.update(self.engine.local_params())
        p.step += 1
        p.samples_seen += int(sums["samples"])
        p.tokens_seen += int(sums["tokens"])
        p.flops_seen += sums["flops"]
        if self.config.train.record_samples:
            self._record_samples(batches)
        step_time = time.perf_counter() - start + data_wait
        metrics = {
            "train/loss": sums["loss_sum"] / sums["samples"],
            "train/lr": self.engine.lr,
            "train/grad_norm": grad_norm,
            "perf/step_s": step_time,
            "perf/tokens_per_s": sums["tokens"] / step_time,
            "perf/samples_per_s": sums["samples"] / step_time,
            "perf/data_wait_share": data_wait / step_time,
            "data/skipped_samples": sums["skipped"],
            "data/retries": sums["read_retries"],
            "data/retry_wait_s": sums["read_wait_s"],
            "train/skipped_steps": p.skipped_steps,
            "progress/samples_seen": p.samples_seen,
            "progress/tokens_seen": p.tokens_seen,
            **self.objective.metrics(),
        }
        metrics |= self._peak_memory()
        if self.peak_flops and sums["flops"]:
            metrics["perf/mfu"] = (
                sums["flops"] / step_time / (self.peak_flops * self.dims.world_size)
            )
        return metrics

    def _peak_memory(self) -> dict[str, float]:
        """This rank's high-water marks: host RSS, and the GPU memory torch allocated."""
        peak = {"perf/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if self.runtime.device.type == "cuda":
            peak["perf/peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return peak

    def _record_samples(self, batches: list[Batch]) -> None:
        """An audit trail of the data: which samples each step consumed on this rank."""
        if self.dims.sequence_rank:
            return  # the ranks of a sequence group share their samples
        path = Path(self.config.train.run_dir) / "consumed" / f"rank{self.dims.dp_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = [key for batch in batches for key in batch.keys]
        with open(path, "a") as file:
            file.write(json.dumps({"step": self.progress.step, "keys": keys}) + "\n")

    def fit(self) -> list[float]:
        cfg = self.config.train
        while self.progress.step < cfg.steps:
            metrics = self.train_step()
            step = self.progress.step
            self._stop_if_diverged()
            self.losses.append(metrics["train/loss"])
            self.logger.advance()
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.logger.log(step, metrics)
            if self.evaluator and (
                (self.config.eval.every and step % self.config.eval.every == 0) or step == cfg.steps
            ):
                self.evaluate(final=step == cfg.steps)
            saved = step % cfg.checkpoint_every == 0 or step == cfg.steps
            if saved:
                self.save()
            if self.sampler and (
                (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.steps
            ):
                self.sample()
            self._stop_if_signalled(saved)
        self.checkpointer.wait()  # the last checkpoint is committed before the run returns
        return self.losses

    def _stop_if_diverged(self) -> None:
        bad = self.progress.bad_steps_in_a_row
        if bad > self.config.train.max_bad_steps:
            latest = self.checkpointer.complete_checkpoints()
            raise FloatingPointError(
                f"the loss or gradients were NaN/Inf for {bad} steps in a row (up to step "
                f"{self.progress.step}, more than train.max_bad_steps="
                f"{self.config.train.max_bad_steps}); stopping without saving. The latest "
                f"checkpoint is untouched: {latest[-1] if latest else 'none yet'}"
            )

    def _stop_if_signalled(self, saved: bool) -> None:
        received = self.stop_signals.received if self.stop_signals else None
        if not self.dims.any_rank(received is not None):
            return
        if not saved:
            self.save()
        self.checkpointer.wait()  # the state is on disk before the process goes
        step = self.progress.step
        self.logger.print(f"stopping at step {step} on {received or 'a signal to another rank'}")
        raise Preempted(step, received or "")

    def save(self) -> Path:
        return self.checkpointer.save(self.progress.step)

    def consolidated_weights(self) -> dict:
        """Full EMA weights (raw ones without an EMA), gathered on every rank (collective)."""
        pieces = self.ema.shadow if self.ema is not None else self.engine.local_params()
        return self.engine.full_tensors(pieces)

    @property
    def weights_kind(self) -> str:
        """What `consolidated_weights` gives: "ema" or "raw"."""
        return "ema" if self.ema is not None else "raw"

    def evaluate(self, final: bool) -> None:
        progress = self.progress.state_dict()
        self.logger.log(self.progress.step, self.evaluator(self.engine.model, progress, final))
        self.logger.log_images(self.progress.step, self.evaluator.images)

    def sample(self) -> None:
        """Sample the fixed prompts with the consolidated weights (on rank 0) and log them."""
        weights = self.consolidated_weights()
        if self.runtime.is_main:
            videos = self.sampler(weights, self.progress.step)
            self.logger.log_videos(self.progress.step, videos, self.config.train.sample_fps)

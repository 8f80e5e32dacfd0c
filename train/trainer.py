"""The training loop, and nothing a backend could own.

One step draws `grad_accum` batches, normalises the loss over every sample of the step
(so a sample weighs the same whatever bucket or micro-batch it came in), lets the
engine reduce, clip and apply the gradients, updates the EMA, and then logs, evaluates,
checkpoints and samples on their schedules.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data.pipeline import Batch
from train.checkpoint import Checkpointer
from train.config import Config, config_to_dict
from train.logger import RunLogger
from train.runtime import Runtime, rng_state


@dataclass
class Progress:
    """The trainer's own state, saved in trainer.json beside the weights."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    flops_seen: float = 0.0  # analytic training FLOPs, counted like tokens_seen
    data_state: dict = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        engine,
        objective,
        batches: Iterator[Batch],
        checkpointer: Checkpointer,
        logger: RunLogger,
        ema=None,
        progress: Progress | None = None,
        sampler: Callable | None = None,
        peak_flops: float | None = None,
        evaluator: Callable | None = None,
    ):
        self.config = config
        self.runtime = runtime
        self.engine = engine
        self.objective = objective
        self.batches = batches
        self.checkpointer = checkpointer
        self.logger = logger
        self.ema = ema
        self.progress = progress or Progress()
        self.sampler = sampler
        self.peak_flops = peak_flops
        self.evaluator = evaluator  # called on every rank: the model's forward may be collective
        self.losses: list[float] = []

    def _draw(self) -> tuple[list[Batch], float]:
        start = time.perf_counter()
        batches = [next(self.batches) for _ in range(self.config.train.grad_accum)]
        return batches, time.perf_counter() - start

    def train_step(self) -> dict[str, float]:
        batches, data_wait = self._draw()
        start = time.perf_counter()
        num_samples = sum(len(b.keys) for b in batches)
        loss_sum, tokens, flops = 0.0, 0, 0.0
        for batch in batches:
            with self.runtime.autocast():
                loss = self.objective(self.engine.model, batch, self.runtime.device)
            self.engine.backward(loss.total / num_samples)
            loss_sum += loss.total.item()
            tokens += loss.tokens
            flops += loss.flops
        grad_norm = self.engine.step()
        if self.ema is not None:
            self.ema.update(self.engine.model)
        p = self.progress
        p.step += 1
        p.samples_seen += num_samples
        p.tokens_seen += tokens
        p.flops_seen += flops
        p.data_state = batches[-1].state_after
        step_time = time.perf_counter() - start + data_wait
        metrics = {
            "train/loss": loss_sum / num_samples,
            "train/lr": self.engine.lr,
            "train/grad_norm": grad_norm,
            "perf/tokens_per_s": tokens / step_time,
            "perf/samples_per_s": num_samples / step_time,
            "perf/data_wait_share": data_wait / step_time,
            "data/skipped_samples": sum(b.skipped for b in batches),
            "progress/samples_seen": p.samples_seen,
            "progress/tokens_seen": p.tokens_seen,
        }
        if self.peak_flops and flops:
            metrics["perf/mfu"] = flops / step_time / self.peak_flops
        return metrics

    def fit(self) -> list[float]:
        cfg = self.config.train
        while self.progress.step < cfg.steps:
            metrics = self.train_step()
            step = self.progress.step
            self.losses.append(metrics["train/loss"])
            self.logger.advance()
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.logger.log(step, metrics)
            if self.evaluator and (
                (self.config.eval.every and step % self.config.eval.every == 0) or step == cfg.steps
            ):
                self.evaluate(final=step == cfg.steps)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self.save()
            if self.sampler and (
                (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.steps
            ):
                self.sample()
        return self.losses

    def save(self) -> Path:
        state = {**self.progress.__dict__, "config": config_to_dict(self.config)}
        return self.checkpointer.save(self.progress.step, self.engine, self.ema, state, rng_state())

    def evaluate(self, final: bool) -> None:
        progress = {k: v for k, v in self.progress.__dict__.items() if k != "data_state"}
        self.logger.log(self.progress.step, self.evaluator(self.engine.model, progress, final))

    def sample(self) -> None:
        """Sample the fixed prompts with the EMA weights and log the videos."""
        model = self.engine.model
        if self.ema is not None:
            model = copy.deepcopy(model)
            self.ema.copy_to(model)
        was_training = model.training
        model.eval()
        videos = self.sampler(model, self.progress.step)
        model.train(was_training)
        self.logger.log_videos(self.progress.step, videos, self.config.train.sample_fps)

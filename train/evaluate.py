"""The evaluation loss: flow matching on a fixed held-out set, at fixed times with fixed noise.

Training losses are too noisy to compare the runs of a scaling sweep: their times, noise and
batches are random. Here every sample of a fixed held-out set is scored at the same K flow
times, the quantiles (k + 1/2) / K of the training time distribution (so the mean estimates
the training objective, without caption dropout), against noise drawn from a generator seeded
by (eval.seed, sample key). The same weights give the same loss bit for bit, and two runs of a
sweep differ only by their weights. Beside it, the loss at eval.times evenly spaced flow times
(the same times for every bucket, with noise of their own), per bucket and overall: where in
the denoising a run gains or loses, comparable across runs, steps and resolutions.

The set is a seeded choice of eval.samples held-out samples, cut into batches of one bucket
each (partial batches too: a small held-out set still covers its buckets), the same batches
on any number of ranks. Data-parallel rank r scores batches r, r + world, ...; a rank with a
batch fewer runs one uncounted padding batch (under FSDP every rank must run the same number of
forwards). Every sample's losses are gathered from the rank that scored it and summed in the
set's order on every rank, so the results do not depend on the number of ranks, bit for bit.
Only rank 0 writes `eval/step_XXXXXXXX.json` and, at the end of the run, `eval/final.json`;
both hold every sample's loss as well, so that a sweep's fit can resample the held-out set for
all its runs at once. With eval.videos, generated videos are scored too (train/eval_videos.py),
and `python -m train.evaluate` evaluates a finished run the same way (at the end of this file).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from data.buckets import BucketTable
from data.packing import PackingTable
from data.pipeline import Batch, BatchStream, DataConfig, open_plan
from data.plan import DataPlan, DataState, PlannedBatch
from data.storage import write_atomic
from model.flow import FlowConfig, time_shift, training_loss
from train.config import EvalConfig
from train.eval_videos import EvalVideos, gathered, read_prompts, write_grid
from train.latent_source import LatentSource
from train.parallel import ParallelDims
from train.runtime import Runtime


@dataclass
class EncodedBatch:
    latents: Tensor
    text: Tensor
    mask: Tensor
    keys: list[str]
    micro: dict[str, Tensor]  # the model's micro-conditions: frame rate and native size
    bucket: int  # index into Evaluator.buckets
    counted: bool  # False: a padding batch, run only to match the other ranks' forwards
    captions: list[str]


def eval_times(timesteps: int, num_tokens: int, flow: FlowConfig) -> Tensor:
    """(timesteps,) flow times: quantiles of the training distribution (shifted logit-normal)."""
    quantiles = (torch.arange(timesteps, dtype=torch.float64) + 0.5) / timesteps
    logits = flow.logit_mean + flow.logit_std * torch.special.ndtri(quantiles)
    return time_shift(torch.sigmoid(logits), num_tokens, flow).float()


def fixed_times(count: int) -> Tensor:
    """(count,) evenly spaced flow times, (k + 1/2) / count: the same for every bucket, run
    and step, so that the loss at each is comparable across them (as Open-Sora tracks it)."""
    return (torch.arange(count, dtype=torch.float64) + 0.5) / count


def sample_noise(key: str, seed: int, timesteps: int, shape: tuple[int, ...]) -> Tensor:
    """(timesteps, *shape) noise of one sample, the same whatever its batch, rank or device."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(timesteps, *shape, generator=generator)


def eval_batches(plan: DataPlan, cfg: EvalConfig) -> list[PlannedBatch]:
    """eval.samples held-out samples (a seeded choice) in batches of one bucket each (with
    packing: of one target shape, as many as one packed sequence holds)."""
    bucket_of = {
        int(i): bucket for index, bucket in enumerate(plan.buckets) for i in plan.bucket_ids(index)
    }
    if len(bucket_of) < cfg.samples:
        raise ValueError(
            f"eval.shards={cfg.shards!r} holds {len(bucket_of)} samples that fit a bucket, "
            f"fewer than eval.samples={cfg.samples}"
        )
    chosen = np.random.default_rng(cfg.seed).choice(sorted(bucket_of), cfg.samples, replace=False)
    batches = []
    for bucket in plan.buckets:
        ids = sorted(int(i) for i in chosen if bucket_of[i] == bucket)
        for start in range(0, len(ids), bucket.batch_size):
            batches.append(PlannedBatch(bucket, tuple(ids[start : start + bucket.batch_size])))
    return batches


class Evaluator:
    """Scores a model on this rank's share of the fixed held-out set; see the module docstring."""

    def __init__(
        self,
        cfg: EvalConfig,
        data: DataConfig,
        table: BucketTable | PackingTable,
        source: LatentSource,
        flow: FlowConfig,
        runtime: Runtime,
        dims: ParallelDims,
        run_dir: Path,
        run_facts: dict,
    ):
        self.cfg, self.flow, self.runtime, self.dims = cfg, flow, runtime, dims
        self.out = Path(run_dir) / "eval"
        self.run_facts = run_facts  # written into every result, e.g. model size and parameters
        # Read once, in this process: nothing to gain from loader workers or a clip cache.
        held_out = replace(
            data, shards=cfg.shards, num_workers=0, decoded_cache_mb=0, image_share=None
        )
        state = DataState(cfg.seed, epoch=0, consumed_samples=0)
        plan = open_plan(held_out, table)
        stream = BatchStream(held_out, plan, 0, 1, state)
        chosen = eval_batches(plan, cfg)
        self.buckets = list(dict.fromkeys(b.bucket.shape for b in chosen))  # most tokens first
        keys = [plan.key(i) for batch in chosen for i in batch.sample_ids]
        self.sample_index = {key: i for i, key in enumerate(keys)}
        self.sample_bucket = torch.tensor(
            [self.buckets.index(b.bucket.shape) for b in chosen for _ in b.sample_ids]
        )
        # Split by data-parallel rank: the ranks of a sequence-parallel group share batches.
        mine = chosen[dims.dp_rank :: dims.dp_size]
        # Ranks with a batch fewer run one more, uncounted, so all run as many forwards.
        padding = -(-len(chosen) // dims.dp_size) - len(mine)
        plan = [(b, True) for b in mine] + [(chosen[0], False)] * padding
        # The encoders are frozen, so the held-out latents and captions are encoded once.
        self.source, real = source, []
        with source.encoders() as encoders:
            self.geometry = source.geometry  # tokens of a latent batch, as training counts them
            self.batches = []
            for index, (planned, counted) in enumerate(plan):
                batch = stream.load(planned, 0, index, state)
                self.batches.append(self._encode(batch, source, counted))
                if cfg.videos and counted and batch.bucket[0] > 1:  # videos, not images
                    real.append(self._real_clips(batch, self.batches[-1], encoders))
        self.videos = self._videos(cfg, data, flow, real) if cfg.videos else None
        self.result: dict = {}  # the latest evaluation's, on every rank
        self.images: dict[str, Path] = {}  # and its grid image, on rank 0, for the logger

    @torch.no_grad()
    def _encode(self, batch: Batch, source: LatentSource, counted: bool) -> EncodedBatch:
        if not batch.keys:  # skipping it would leave ranks with unequal numbers of forwards
            raise ValueError(f"eval.shards={self.cfg.shards!r}: no sample of a batch decodes")
        with self.runtime.autocast():
            encoded = source.encode(batch, self.runtime.device)
        bucket = self.buckets.index(batch.bucket)
        device = self.runtime.device
        micro = {"fps": batch.fps.to(device), "native_size": batch.native_size.to(device)}
        return EncodedBatch(
            encoded.latents,
            encoded.text,
            encoded.mask,
            batch.keys,
            micro,
            bucket,
            counted,
            batch.captions,
        )

    @torch.no_grad()
    def _real_clips(self, batch: Batch, encoded: EncodedBatch, encoders) -> tuple[list, Tensor]:
        """The held-out clips' pixels, (B, 3, T, H, W) in [-1, 1]: decoded from latent shards."""
        if batch.video is not None:
            pixels = batch.video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        else:
            with self.runtime.autocast():
                pixels = encoders.autoencoder.decode(encoded.latents).float().clamp(-1, 1)
        return [self.sample_index[key] for key in batch.keys], pixels.cpu()

    def _videos(self, cfg: EvalConfig, data: DataConfig, flow: FlowConfig, real) -> EvalVideos:
        """The evaluation videos: prompted by eval.prompts, or by the held-out captions."""
        if cfg.prompts:
            prompts = read_prompts(cfg.prompts)
        else:
            mine = {
                self.sample_index[key]: caption
                for batch in self.batches
                if batch.counted
                for key, caption in zip(batch.keys, batch.captions, strict=True)
            }
            captions = gathered(mine)
            prompts = [captions[i] for i in sorted(captions)]
        return EvalVideos(cfg, prompts, real, flow, data.fps, self.runtime, self.dims)

    @torch.no_grad()
    def _sums(self, model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """(buckets, 3) float64 sums of per-sample loss, its square and the sample count;
        (buckets, eval.times, 3) the same at each fixed time; and (samples, 2) every held-out
        sample's loss and whether it was scored (1) or not (0).

        Each sample's losses come from the one rank that scored it; the sums are then taken on
        every rank in the set's order, so they do not depend on the number of ranks, bit for
        bit (a sample's loss does not either: its batch is the same on any number of ranks)."""
        device = self.runtime.device
        # Per sample: its loss, whether it was scored, and its losses at the fixed times.
        losses = torch.zeros(len(self.sample_index), 2 + self.cfg.times, dtype=torch.float64)
        losses = losses.to(device)
        for batch in self.batches:
            tokens = self.geometry.latent_tokens(batch.latents.shape[2:])
            per_time = self._losses(
                model, batch, eval_times(self.cfg.timesteps, tokens, self.flow), ""
            )
            fixed = self._losses(model, batch, fixed_times(self.cfg.times), "fixed")
            # A sequence group's ranks scored the same batch: its first rank reports it.
            if batch.counted and self.dims.sequence_rank == 0:
                rows = [self.sample_index[key] for key in batch.keys]
                scored = torch.ones_like(per_time[0])
                losses[rows] = torch.cat(
                    [per_time.mean(dim=0)[:, None], scored[:, None], fixed.T], 1
                )
        if dist.is_initialized():
            dist.all_reduce(losses)  # each row is one rank's, the others' zeros: exact
        losses = losses.cpu()
        sums = torch.zeros(len(self.buckets), 3, dtype=torch.float64)
        at_times = torch.zeros(len(self.buckets), self.cfg.times, 3, dtype=torch.float64)
        scored = losses[:, 1] > 0
        for bucket in range(len(self.buckets)):
            mine = losses[(self.sample_bucket == bucket) & scored]
            sums[bucket] = _moments(mine[:, 0])
            for k in range(self.cfg.times):
                at_times[bucket, k] = _moments(mine[:, 2 + k])
        return sums, at_times, losses[:, :2]

    def _losses(
        self, model: nn.Module, batch: EncodedBatch, times: Tensor, noise_kind: str
    ) -> Tensor:
        """(len(times), B) float64 losses of the batch's samples at `times`, against each
        sample's own noise (of `noise_kind`: each set of times draws its own)."""
        device = self.runtime.device
        noise = torch.stack(
            [
                sample_noise(key + noise_kind, self.cfg.seed, len(times), batch.latents.shape[1:])
                for key in batch.keys
            ],
            dim=1,
        ).to(device)  # (times, B, C, T, H, W)
        losses = torch.zeros(len(times), len(batch.keys), dtype=torch.float64, device=device)
        for k, t in enumerate(times.tolist()):
            t_batch = torch.full((len(batch.keys),), t, device=device)
            with self.runtime.autocast():
                loss = training_loss(
                    model, batch.latents, batch.text, batch.mask, t_batch, noise[k],
                    model_kwargs=batch.micro,
                )  # fmt: skip
            losses[k] = loss.double()
        return losses

    def __call__(self, model: nn.Module, progress: dict, final: bool) -> dict[str, float]:
        """Evaluate on every rank; returns the metrics to log, and writes the JSON on rank 0."""
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        sums, at_times, samples = self._sums(model)
        seconds = {"loss": time.perf_counter() - start}
        generated, grid = self._generate(model) if self.videos else ({}, None)
        seconds |= self.videos.seconds if self.videos else {}
        seconds["total"] = time.perf_counter() - start
        model.train(was_training)
        times = [f"{t:.3g}" for t in fixed_times(self.cfg.times).tolist()]
        result = {
            **self.run_facts,
            **progress,
            **summarise(sums.sum(dim=0)),
            "loss_at_time": _by_time(times, at_times.sum(dim=0)),
            "buckets": {
                "x".join(map(str, shape)): {**summarise(row), "loss_at_time": _by_time(times, rows)}
                for shape, row, rows in zip(self.buckets, sums, at_times, strict=True)
            },
            **{name.removeprefix("eval/"): value for name, value in generated.items()},
            **({"feature_models": self.videos.models} if self.videos else {}),
            "seconds": seconds,  # rank 0's: where the evaluation's time went
            # Per sample, so a sweep's fit can resample the held-out set for all runs at once.
            "sample_losses": {
                key: samples[i, 0].item()
                for key, i in self.sample_index.items()
                if samples[i, 1] > 0
            },
        }
        self.result = result
        if self.runtime.is_main:
            self._write(f"step_{progress['step']:08d}.json", result)
            if final:
                self._write("final.json", result)
            if grid is not None:
                path = write_grid(grid, self.out / f"step_{progress['step']:08d}.png")
                self.images = {"eval/samples": path}
        metrics = {"eval/loss": result["loss"], "eval/loss_se": result["loss_se"], **generated}
        for t, values in result["loss_at_time"].items():
            metrics[f"eval/loss_at_time/{t}"] = values["loss"]
        for name, values in result["buckets"].items():
            metrics[f"eval/loss/{name}"] = values["loss"]
        return metrics

    def _generate(self, model: nn.Module) -> tuple[dict[str, float], np.ndarray | None]:
        with self.source.encoders() as encoders:
            return self.videos(model, encoders.autoencoder, encoders.text_encoder)

    def _write(self, name: str, result: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / name, json.dumps(result, indent=2) + "\n")


def _moments(losses: Tensor) -> Tensor:
    """(3,) the sum of `losses`, of their squares, and their count: what `summarise` reads."""
    return torch.stack([losses.sum(), losses.square().sum(), losses.new_tensor(len(losses))])


def _by_time(times: list[str], rows: Tensor) -> dict:
    return {time: summarise(row) for time, row in zip(times, rows, strict=True)}


def summarise(row: Tensor) -> dict:
    """Mean loss, its standard error and the sample count from (sum, sum of squares, count)."""
    total, squares, count = row.tolist()
    mean = total / count
    variance = max(squares - count * mean * mean, 0.0) / max(count - 1, 1)
    return {"loss": mean, "loss_se": math.sqrt(variance / count), "samples": int(count)}


# --- python -m train.evaluate ------------------------------------------------------------------


USAGE = (
    "python -m train.evaluate checkpoint=<run dir, export or checkpoint folder> "
    "[weights=ema|raw] [out=<run dir>] [key=value ...]"
)


def evaluate_checkpoint(argv: list[str]) -> dict:
    """Evaluate a trained model as its run would have, on the run's config with `key=value`
    overrides (eval.* usually): one process, or the ranks torchrun starts, sharing the set.
    Writes `<out>/eval/step_XXXXXXXX.json` (and `.png` with eval.videos); returns the result."""
    from omegaconf import OmegaConf

    from train.build import load_trained
    from train.checkpoint import find_weights, read_weights
    from train.config import Config, ParallelConfig, to_config
    from train.runtime import init_runtime, launch_env, seed_everything
    from train.stages import stage_type

    args = dict(item.split("=", 1) for item in argv if item.split("=", 1)[0] in COMMAND_KEYS)
    overrides = [item for item in argv if item.split("=", 1)[0] not in COMMAND_KEYS]
    if "checkpoint" not in args:
        raise SystemExit(f"usage: {USAGE}")
    saved = find_weights(args["checkpoint"], args.get("weights", "ema"))
    merged = OmegaConf.merge(
        OmegaConf.structured(Config), saved.config, OmegaConf.from_dotlist(overrides)
    )
    config = to_config(merged)
    if not config.eval.shards:
        raise ValueError("train.evaluate needs eval.shards: the run had no held-out set")
    runtime = init_runtime(config.train.device, config.train.precision, launch_env()[1] > 1)
    dims = ParallelDims.resolve(ParallelConfig(backend="ddp"), runtime.world_size, runtime.rank)
    seed_everything(config.train.seed)  # as the run did: anything random is built alike
    stage = stage_type(config)(config, runtime)
    load_trained(stage.model, read_weights(saved, stage.model), saved.folder)
    run_dir = Path(args.get("out") or saved.run_dir)
    evaluator = stage.evaluator(config, dims, run_dir)
    progress = saved.progress or {"step": 0}
    evaluator(stage.model, progress, final=False)
    if dist.is_initialized():
        dist.destroy_process_group()
    return evaluator.result


COMMAND_KEYS = ("checkpoint", "weights", "out")


if __name__ == "__main__":
    import os
    import sys

    result = evaluate_checkpoint(sys.argv[1:])
    if int(os.environ.get("RANK", 0)) == 0:
        summary = {k: v for k, v in result.items() if k not in ("sample_losses", "buckets")}
        print(json.dumps(summary, indent=2))

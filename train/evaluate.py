"""The evaluation loss: flow matching on a fixed held-out set, at fixed times with fixed noise.

Training losses are too noisy to compare the runs of a scaling sweep: their times, noise and
batches are random. Here every sample of a fixed held-out set is scored at the same K flow
times, the quantiles (k + 1/2) / K of the training time distribution (so the mean estimates
the training objective, without caption dropout), against noise drawn from a generator seeded
by (eval.seed, sample key). The same weights give the same loss bit for bit, and two runs of a
sweep differ only by their weights.

The set is a seeded choice of eval.samples held-out samples, cut into batches of one bucket
each (partial batches too: a small held-out set still covers its buckets), the same batches
on any number of ranks. Data-parallel rank r scores batches r, r + world, ...; a rank with a
batch fewer runs one uncounted padding batch (under FSDP every rank must run the same number of
forwards). The per-bucket sums are all-reduced, and only rank 0 writes `eval/step_XXXXXXXX.json`
and, at the end of the run, `eval/final.json`; both hold every sample's loss as well, so that a
sweep's fit can resample the held-out set for all its runs at once.

"""

from __future__ import annotations

import hashlib
import json
import math
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


def eval_times(timesteps: int, num_tokens: int, flow: FlowConfig) -> Tensor:
    """(timesteps,) flow times: quantiles of the training distribution (shifted logit-normal)."""
    quantiles = (torch.arange(timesteps, dtype=torch.float64) + 0.5) / timesteps
    logits = flow.logit_mean + flow.logit_std * torch.special.ndtri(quantiles)
    return time_shift(torch.sigmoid(logits), num_tokens, flow).float()


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
        # Split by data-parallel rank: the ranks of a sequence-parallel group share batches.
        mine = chosen[dims.dp_rank :: dims.dp_size]
        # Ranks with a batch fewer run one more, uncounted, so all run as many forwards.
        padding = -(-len(chosen) // dims.dp_size) - len(mine)
        plan = [(b, True) for b in mine] + [(chosen[0], False)] * padding
        # The encoders are frozen, so the held-out latents and captions are encoded once.
        with source.encoders():
            self.geometry = source.geometry  # tokens of a latent batch, as training counts them
            self.batches = [
                self._encode(stream.load(planned, 0, index, state), source, counted)
                for index, (planned, counted) in enumerate(plan)
            ]

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
            encoded.latents, encoded.text, encoded.mask, batch.keys, micro, bucket, counted
        )

    @torch.no_grad()
    def _sums(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """(buckets, 3) float64 sums of per-sample loss, its square and the sample count, and
        (samples, 2) every held-out sample's loss and whether it was scored (1) or not (0)."""
        sums = torch.zeros(len(self.buckets), 3, dtype=torch.float64, device=self.runtime.device)
        samples = torch.zeros(len(self.sample_index), 2, dtype=torch.float64, device=sums.device)
        for batch in self.batches:
            tokens = self.geometry.latent_tokens(batch.latents.shape[2:])
            times = eval_times(self.cfg.timesteps, tokens, self.flow)
            noise = torch.stack(
                [
                    sample_noise(key, self.cfg.seed, len(times), batch.latents.shape[1:])
                    for key in batch.keys
                ],
                dim=1,
            ).to(self.runtime.device)  # (timesteps, B, C, T, H, W)
            per_sample = torch.zeros(len(batch.keys), dtype=torch.float64, device=sums.device)
            for k, time in enumerate(times.tolist()):
                t_batch = torch.full((len(batch.keys),), time, device=self.runtime.device)
                with self.runtime.autocast():
                    loss = training_loss(
                        model,
                        batch.latents,
                        batch.text,
                        batch.mask,
                        t_batch,
                        noise[k],
                        model_kwargs=batch.micro,
                    )
                per_sample += loss.double()
            per_sample /= len(times)
            if not batch.counted:
                continue
            rows = [self.sample_index[key] for key in batch.keys]
            samples[rows] = torch.stack([per_sample, torch.ones_like(per_sample)], dim=1)
            sums[batch.bucket] += torch.stack(
                [
                    per_sample.sum(),
                    per_sample.square().sum(),
                    per_sample.new_tensor(len(per_sample)),
                ]
            )
        if dist.is_initialized():
            for values in (sums, samples):
                dist.all_reduce(values)
                # Every rank of a sequence group scored the same batches.
                values /= self.dims.sequence_size
        return sums, samples

    def __call__(self, model: nn.Module, progress: dict, final: bool) -> dict[str, float]:
        """Evaluate on every rank; returns the metrics to log, and writes the JSON on rank 0."""
        was_training = model.training
        model.eval()
        sums, samples = (values.cpu() for values in self._sums(model))
        model.train(was_training)
        result = {
            **self.run_facts,
            **progress,
            **summarise(sums.sum(dim=0)),
            "buckets": {
                "x".join(map(str, shape)): summarise(row)
                for shape, row in zip(self.buckets, sums, strict=True)
            },
            # Per sample, so a sweep's fit can resample the held-out set for all runs at once.
            "sample_losses": {
                key: samples[i, 0].item()
                for key, i in self.sample_index.items()
                if samples[i, 1] > 0
            },
        }
        if self.runtime.is_main:
            self._write(f"step_{progress['step']:08d}.json", result)
            if final:
                self._write("final.json", result)
        metrics = {"eval/loss": result["loss"], "eval/loss_se": result["loss_se"]}
        for name, values in result["buckets"].items():
            metrics[f"eval/loss/{name}"] = values["loss"]
        return metrics

    def _write(self, name: str, result: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / name, json.dumps(result, indent=2) + "\n")


def summarise(row: Tensor) -> dict:
    """Mean loss, its standard error and the sample count from (sum, sum of squares, count)."""
    total, squares, count = row.tolist()
    mean = total / count
    variance = max(squares - count * mean * mean, 0.0) / max(count - 1, 1)
    return {"loss": mean, "loss_se": math.sqrt(variance / count), "samples": int(count)}

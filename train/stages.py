"""What differs between the stages a run can train, each behind the same few calls.

A stage builds its model, objective and bucket table, and says how many steps a run takes, how it
is evaluated and sampled during training, and what it exports at the end. `python -m train` runs
any of them the same way (train/__main__.py):

- `DiTStage`: flow matching of Tessera's DiT on the latents of a frozen autoencoder, from its
  latent source (train/latent_source.py): encoded every step, or read from latent shards;
- `PretrainedStage`: the same for a pretrained diffusers transformer (model.pretrained set), fully
  or with LoRA;
- `AutoencoderStage`: the video autoencoder itself (reconstruction plus KL).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from data.buckets import BucketTable
from data.mp4 import write_mp4
from data.packing import PackingTable
from data.pipeline import Batch, build_loader
from data.plan import DataPlan, DataState
from model.autoencoder import build_autoencoder
from model.flops import dit_param_count, dit_train_flops
from model.pretrained import family_of
from train.budget import budget_steps
from train.build import (
    build_dit,
    check_sequence_layout,
    frozen,
    latent_geometry,
    load_trained,
    model_name,
    sample_table,
)
from train.checkpoint import export
from train.config import Config, config_to_dict
from train.encoders import video_to_float
from train.evaluate import Evaluator
from train.latent_source import open_latent_sources, stored_latents_record
from train.objectives import (
    AutoencoderObjective,
    FlowMatchingObjective,
    Objective,
    PackedFlowMatchingObjective,
)
from train.parallel import ParallelDims
from train.pretrained import cast_frozen, export_pretrained
from train.runtime import Runtime
from train.sample import VideoGenerator, training_samples

Sampler = Callable[[dict, int], dict[str, Path]]  # (consolidated weights, step) -> videos


class Stage(Protocol):
    """Built as `stage(config, runtime)` on every rank, after the initial weights' seed is set;
    the other calls take the run's final config (its steps set by `train_steps`)."""

    model: nn.Module  # what trains
    objective: Objective
    table: BucketTable | PackingTable

    @staticmethod
    def check_layout(config: Config, dims: ParallelDims) -> None:
        """Refuse a parallel layout the stage cannot train with, before any work."""

    def train_steps(self, config: Config, plan: DataPlan, dims: ParallelDims) -> int:
        """How many optimizer steps the run takes."""

    def evaluator(self, config: Config, dims: ParallelDims, run_dir: Path) -> Evaluator | None:
        """The held-out evaluation the trainer runs on its schedule, if any."""

    def sampler(self, config: Config, plan: DataPlan, run_dir: Path) -> Sampler | None:
        """Training-time samples; built after the RNG is set for training, as it draws from it."""

    def export(
        self, config: Config, weights: dict, kind: str, batches: Iterator[Batch], run_dir: Path
    ) -> None:
        """The trained weights (consolidated on every rank; `kind` "ema" or "raw") in their
        final form; `batches` continue the training stream."""


def stage_type(config: Config) -> type[Stage]:
    if config.train.stage == "autoencoder":
        return AutoencoderStage
    return PretrainedStage if config.model.pretrained is not None else DiTStage


class DiTStage:
    """The DiT's latents and caption embeddings come from the latent source of data.shards, the
    held-out set's from that of eval.shards (train/latent_source.py)."""

    def __init__(self, config: Config, runtime: Runtime):
        self.runtime = runtime
        sources = open_latent_sources(config, runtime)
        self.source, self.held_out, self.encoders = (
            sources.train,
            sources.held_out,
            sources.encoders,
        )
        channels, text_dim = self.source.latent_channels, self.source.text_dim
        self.model = build_dit(config, channels, text_dim).to(runtime.device)
        self.table = sample_table(config, self.source.geometry)
        objective = PackedFlowMatchingObjective if config.packing.enabled else FlowMatchingObjective
        self.objective = objective(
            self.source,
            config.flow,
            config.conditioning,
            lambda num_tokens: self.train_flops(config, num_tokens),
            config.train.seed,
            self.given_as_channels(config),
        )

    @staticmethod
    def given_as_channels(config: Config) -> bool:
        """Whether the model is shown given frames as input channels (else they stay clean)."""
        return False

    @staticmethod
    def check_layout(config: Config, dims: ParallelDims) -> None:
        dims.check_model(config.model.num_heads)
        check_sequence_layout(config, dims)

    def train_flops(self, config: Config, num_tokens: int) -> float:
        """Analytic training FLOPs of one sample of `num_tokens` latent tokens."""
        return dit_train_flops(
            config.model,
            self.source.latent_channels,
            self.source.text_dim,
            num_tokens=num_tokens,
            text_tokens=config.text_encoder.max_length,
        )

    def train_steps(self, config: Config, plan: DataPlan, dims: ParallelDims) -> int:
        """train.steps, or as many as train.budget_flops buys on this data."""
        if not config.train.budget_flops:
            return config.train.steps
        steps, _ = budget_steps(
            config.train.budget_flops,
            config.data,
            plan,
            lambda bucket: self.train_flops(config, bucket.tokens_per_sample),
            config.train.grad_accum,
            dims.dp_size,
        )
        return steps

    def evaluator(self, config: Config, dims: ParallelDims, run_dir: Path) -> Evaluator | None:
        """The fixed evaluation loss; its results also carry what a scaling-law fit needs."""
        if self.held_out is None:
            return None
        facts = {
            "model": config.model.size,
            "params": dit_param_count(config.model, self.model.in_channels, self.model.text_dim),
            "budget_flops": config.train.budget_flops,
            "steps": config.train.steps,
        }
        return Evaluator(
            config.eval,
            config.data,
            self.table,
            self.held_out,
            config.flow,
            self.runtime,
            dims,
            run_dir,
            facts,
        )

    def sampler(self, config: Config, plan: DataPlan, run_dir: Path) -> Sampler | None:
        """The fixed prompts, sampled with consolidated weights on an unsharded copy."""
        if not config.train.sample_prompts:
            return None
        cfg = config.train
        source = self.source
        model = frozen(
            build_dit(config, source.latent_channels, source.text_dim), self.runtime.device
        )
        latent_frames = source.geometry.latent_frames(cfg.sample_frames)
        provenance = {"generator": "tessera", "model": model_name(config)}

        def sample(weights: dict, step: int) -> dict[str, Path]:
            load_trained(model, weights, f"the weights of step {step}")
            with source.encoders() as encoders:
                generator = VideoGenerator(
                    model,
                    encoders.autoencoder,
                    encoders.text_encoder,
                    config.flow,
                    cfg.sample_fps,
                    cfg.sample_steps,
                    context=max(1, min(2, latent_frames - 1)),
                    autocast=self.runtime.autocast,
                )
                samples = training_samples(
                    generator,
                    cfg.sample_modes,
                    cfg.sample_prompts,
                    cfg.sample_frames,
                    cfg.sample_height,
                    cfg.sample_width,
                )
            return {
                name: write_mp4(
                    run_dir / "samples" / f"step_{step:08d}_{name}.mp4",
                    video,
                    cfg.sample_fps,
                    {**provenance, "checkpoint": f"{run_dir} step {step}", "mode": mode}
                    | {"prompt": prompt, "step": step},
                )
                for name, (mode, prompt, video) in samples.items()
            }

        return sample

    def export(
        self, config: Config, weights: dict, kind: str, batches: Iterator[Batch], run_dir: Path
    ) -> None:
        if self.runtime.is_main:
            self.export_weights(config, weights, run_dir, kind)

    def export_weights(self, config: Config, weights: dict, run_dir: Path, kind: str) -> Path:
        return export(run_dir, weights, config_to_dict(config), kind)


class PretrainedStage(DiTStage):
    def __init__(self, config: Config, runtime: Runtime):
        if self.given_as_channels(config) and stored_latents_record(config.data.shards):
            raise ValueError(
                f"data.shards={config.data.shards!r} are latent shards, but "
                f"model.pretrained.family={config.model.pretrained.family} is shown its given "
                "frames encoded on their own, from the clip's pixels: train it on pixel shards"
            )
        super().__init__(config, runtime)
        cast_frozen(self.model, config.lora, runtime.autocast_dtype)

    @staticmethod
    def given_as_channels(config: Config) -> bool:
        return family_of(config.model.pretrained).given == "channels"

    def export_weights(self, config: Config, weights: dict, run_dir: Path, kind: str) -> Path:
        """Also in the layouts diffusers and others read."""
        out = super().export_weights(config, weights, run_dir, kind)
        unsharded = build_dit(config, self.source.latent_channels, self.source.text_dim)
        export_pretrained(config, unsharded, weights, out)
        return out


class AutoencoderStage:
    def __init__(self, config: Config, runtime: Runtime):
        self.runtime = runtime
        if stored_latents_record(config.data.shards) is not None:
            raise ValueError(
                f"data.shards={config.data.shards!r} are latent shards: the autoencoder stage "
                "trains on pixels"
            )
        self.model = build_autoencoder(config.autoencoder).to(runtime.device)
        # Batches keep the DiT's geometry, so that both stages see the same buckets.
        self.table = BucketTable(config.buckets, latent_geometry(config, self.model))
        self.objective = AutoencoderObjective()

    @staticmethod
    def check_layout(config: Config, dims: ParallelDims) -> None:
        if dims.backend not in ("none", "ddp"):
            raise ValueError(
                f"parallel.backend={dims.backend}: the autoencoder stage trains with none or ddp"
            )

    def train_steps(self, config: Config, plan: DataPlan, dims: ParallelDims) -> int:
        return config.train.steps  # train.budget_flops counts DiT FLOPs (refused here)

    def evaluator(self, config: Config, dims: ParallelDims, run_dir: Path) -> None:
        return None

    def sampler(self, config: Config, plan: DataPlan, run_dir: Path) -> Sampler:
        """Originals beside their reconstructions, on a batch of its own, so that sampling never
        takes one from the training stream."""
        held_out = build_loader(
            replace(config.data, num_workers=0),
            plan,
            0,
            1,
            DataState(seed=config.data.seed + 1, epoch=0, consumed_samples=0),
        )
        batch = next(iter(held_out))
        model = copy.deepcopy(self.model).eval()

        @torch.no_grad()
        def sample(weights: dict, step: int) -> dict[str, Path]:
            model.load_state_dict(weights, strict=False)  # buffers (calibration) stay as they are
            video = video_to_float(batch.video, next(model.parameters()).device)
            recon = model.decode(model.encode(video)).clamp(-1, 1)
            pair = torch.cat([video, recon], dim=-1)  # side by side
            frames = (pair + 1) * 127.5
            frames = frames.round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
            path = run_dir / "samples" / f"step_{step:08d}_reconstruction.mp4"
            return {"reconstruction": write_mp4(path, frames[0], config.train.sample_fps)}

        return sample

    def export(
        self, config: Config, weights: dict, kind: str, batches: Iterator[Batch], run_dir: Path
    ) -> None:
        """On the main rank: the latent normalisation set on training data, then export/."""
        if not self.runtime.is_main:
            return
        model = self.model
        model.load_state_dict(weights, strict=False)
        device = next(model.parameters()).device
        model.eval()
        model.calibrate(video_to_float(b.video, device) for b in itertools.islice(batches, 8))
        export(run_dir, model.state_dict(), config_to_dict(config), kind)

"""Entry point: `python -m train [hydra overrides]`.

Builds the parts a run needs from its typed Config, restores the latest checkpoint of the
run directory when there is one, and trains. Stages: `dit` (flow matching on the latents
of a frozen autoencoder) and `autoencoder` (the video VAE itself).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from data.mp4 import write_mp4
from data.pipeline import build_loader, open_plan
from data.plan import DataState
from model.autoencoder import build_autoencoder
from model.flops import dit_param_count, dit_train_flops, peak_flops
from model.text import TextEncoder
from train.budget import budget_steps
from train.build import build_bucket_table, build_dit, frozen, model_name
from train.checkpoint import Checkpointer, export
from train.config import Config, config_to_dict, register_configs, to_config
from train.ema import EMA
from train.evaluate import Evaluator
from train.logger import RunLogger
from train.objectives import (
    AutoencoderObjective,
    EncodingCache,
    FlowMatchingObjective,
    video_to_float,
)
from train.parallel import ParallelDims, build_engine
from train.runtime import Runtime, init_runtime, launch_env, seed_everything, shutdown
from train.sample import VideoGenerator, training_samples
from train.signals import PREEMPTED_MARKER, Preempted, StopSignals
from train.state import DataPosition, checkpoint_stores
from train.trainer import Progress, Trainer
from train.wan import cast_frozen, export_wan, load_trained


def _dit_sampler(config: Config, autoencoder, text_encoder, runtime: Runtime, run_dir: Path):
    """Samples the fixed prompts with consolidated weights on an unsharded copy of the DiT."""
    cfg = config.train
    model = frozen(build_dit(config, autoencoder, text_encoder), runtime.device)

    def sample(weights: dict, step: int) -> dict[str, Path]:
        load_trained(model, weights, f"the weights of step {step}")
        latent_frames = (cfg.sample_frames - 1) // autoencoder.temporal_compression + 1
        generator = VideoGenerator(
            model,
            autoencoder,
            text_encoder,
            config.flow,
            cfg.sample_fps,
            cfg.sample_steps,
            context=max(1, min(2, latent_frames - 1)),
            autocast=runtime.autocast,
        )
        samples = training_samples(
            generator,
            cfg.sample_modes,
            cfg.sample_prompts,
            cfg.sample_frames,
            cfg.sample_height,
            cfg.sample_width,
        )
        provenance = {"generator": "tessera", "model": model_name(config)}
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


def _reconstruction_sampler(config: Config, model, batch, run_dir: Path):
    """Originals beside their reconstructions, for the autoencoder stage."""
    model = copy.deepcopy(model).eval()

    @torch.no_grad()
    def sample(weights: dict, step: int) -> dict[str, Path]:
        model.load_state_dict(weights, strict=False)  # buffers (calibration) stay as they are
        video = video_to_float(batch.video, next(model.parameters()).device)
        recon = model.decode(model.encode(video)).clamp(-1, 1)
        pair = torch.cat([video, recon], dim=-1)  # side by side
        frames = ((pair + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        path = run_dir / "samples" / f"step_{step:08d}_reconstruction.mp4"
        return {"reconstruction": write_mp4(path, frames[0], config.train.sample_fps)}

    return sample


def _calibrate_and_export(config: Config, trainer: Trainer, batches, run_dir: Path) -> None:
    """Autoencoder stage: set the latent normalisation on training data, then export."""
    model = trainer.engine.module
    model.load_state_dict(trainer.consolidated_weights(), strict=False)
    device = next(model.parameters()).device
    model.eval()
    model.calibrate(video_to_float(b.video, device) for b in itertools.islice(batches, 8))
    kind = "ema" if trainer.ema is not None else "raw"
    export(run_dir, model.state_dict(), config_to_dict(config), kind)


def _check_parallel(config: Config) -> ParallelDims:
    """The parallel layout, checked before any process group or file is made."""
    rank, world_size, _ = launch_env()
    dims = ParallelDims.resolve(config.parallel, world_size, rank)
    if config.train.stage == "dit":
        dims.check_model(config.model.num_heads)
    elif dims.backend not in ("none", "ddp"):
        raise ValueError(
            f"parallel.backend={dims.backend}: the autoencoder stage trains with none or ddp"
        )
    return dims


def _evaluator(
    config: Config, table, objective, model, runtime: Runtime, dims: ParallelDims, run_dir: Path
):
    """The fixed evaluation loss; its results also carry what a scaling-law fit needs."""
    facts = {
        "model": config.model.size,
        "params": dit_param_count(config.model, model.in_channels, model.text_dim),
        "budget_flops": config.train.budget_flops,
        "steps": config.train.steps,
    }
    return Evaluator(
        config.eval, config.data, table, objective, config.flow, runtime, dims, run_dir, facts
    )


def run(config: Config) -> list[float]:
    dims = _check_parallel(config)
    runtime = init_runtime(
        config.train.device, config.train.precision, config.parallel.backend != "none"
    )
    dims.build_mesh(runtime.device.type)
    run_dir = Path(config.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.train.seed)  # identical initial weights on every rank
    is_dit = config.train.stage == "dit"
    if is_dit:
        autoencoder = frozen(build_autoencoder(config.autoencoder), runtime.device)
        text_encoder = frozen(TextEncoder(config.text_encoder), runtime.device)
        model = build_dit(config, autoencoder, text_encoder).to(runtime.device)
        cast_frozen(model, config.lora, runtime.autocast_dtype)
        flops = partial(
            dit_train_flops,
            config.model,
            autoencoder.latent_channels,
            text_encoder.dim,
            text_tokens=config.text_encoder.max_length,
        )
        objective = FlowMatchingObjective(
            autoencoder,
            text_encoder,
            config.flow,
            config.conditioning,
            config.model.patch_size,
            lambda n: flops(num_tokens=n),
            config.train.seed,
            EncodingCache(config.train.encoding_cache_mb * 2**20)
            if config.train.encoding_cache_mb
            else None,
        )
    else:
        autoencoder = model = build_autoencoder(config.autoencoder).to(runtime.device)
        objective = AutoencoderObjective()
    table = build_bucket_table(config, autoencoder)
    plan = open_plan(config.data, table)  # once per run: the loader and the budget share it
    if config.train.budget_flops:  # a DiT stage (checked): its steps come from the budget
        steps, _ = budget_steps(
            config.train.budget_flops,
            config.data,
            plan,
            lambda bucket: flops(num_tokens=bucket.tokens_per_sample),
            config.train.grad_accum,
            dims.dp_size,
        )
        config = replace(config, train=replace(config.train, steps=steps))

    engine = build_engine(
        model,
        config.parallel,
        config.optim,
        dims,
        config.train.grad_accum,
        config.train.steps,
        runtime.autocast_dtype,
    )
    ema = EMA(engine, config.train.ema_decay) if config.train.ema_decay > 0 else None
    progress = Progress()
    data = DataPosition(DataState(seed=config.data.seed, epoch=0, consumed_samples=0))
    config_values = config_to_dict(config)
    stores = checkpoint_stores(engine, ema, progress, data, dims.layout(), config_values)
    checkpointer = Checkpointer(run_dir, stores, config.train.keep_last, config.train.keep_every)
    evaluator = (
        _evaluator(config, table, objective, model, runtime, dims, run_dir)
        if is_dit and config.eval.shards
        else None
    )
    # Each rank's own generators; a checkpoint restores them, except on a rank it has none for.
    seed_everything(config.train.seed + 1_000_003 * runtime.rank)
    restored = checkpointer.load_latest(config.train.resume)
    loader = build_loader(config.data, plan, dims.dp_rank, dims.dp_size, data.state)
    batches = data.track(loader)

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config_values))
    logger = RunLogger(
        config.logger,
        run_dir,
        config.name,
        config_values,
        config.train.steps,
        progress.step,
        enabled=runtime.is_main,
    )
    logger.print(dims.describe())
    if restored:
        logger.print(f"resumed from step {progress.step} ({checkpointer.root})")
    if is_dit:
        sampler = (
            _dit_sampler(config, autoencoder, text_encoder, runtime, run_dir)
            if config.train.sample_prompts
            else None
        )
    else:
        # A batch of its own, so sampling never takes one from the training stream.
        held_out = build_loader(
            replace(config.data, num_workers=0),
            plan,
            0,
            1,
            DataState(seed=config.data.seed + 1, epoch=0, consumed_samples=0),
        )
        sampler = _reconstruction_sampler(config, model, next(iter(held_out)), run_dir)
    trainer = Trainer(
        config,
        runtime,
        dims,
        engine,
        objective,
        batches,
        checkpointer,
        logger,
        ema,
        progress,
        sampler,
        peak_flops(runtime.device),
        StopSignals().install(),
        evaluator,
    )
    try:
        losses = trainer.fit()
    except BaseException as error:
        if isinstance(error, Preempted) and runtime.is_main:
            (run_dir / PREEMPTED_MARKER).write_text(f"step {error.step} {error.signal_name}\n")
        shutdown()  # a failed or preempted run leaves no process group behind
        raise
    finally:
        trainer.stop_signals.restore()
        logger.close()
    if is_dit:
        weights = trainer.consolidated_weights()
        if runtime.is_main:
            out = export(run_dir, weights, config_values, "ema" if ema is not None else "raw")
            if config.model.wan is not None:  # also in the layouts diffusers and others read
                export_wan(config, build_dit(config, autoencoder, text_encoder), weights, out)
    elif runtime.is_main:
        _calibrate_and_export(config, trainer, batches, run_dir)
    shutdown()
    return losses


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    if hydra_config.mode == RunMode.MULTIRUN:  # every job of a sweep gets its own directory
        cfg.train.run_dir = hydra_config.runtime.output_dir
    run(to_config(cfg))


register_configs()

if __name__ == "__main__":
    main()

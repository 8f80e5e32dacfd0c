"""Entry point: `python -m train [hydra overrides]`.

Builds the parts a run needs from its typed Config, restores the latest checkpoint of the
run directory when there is one, and trains. Stages: `dit` (flow matching on the latents
of a frozen autoencoder) and `autoencoder` (the video VAE itself).
"""

from __future__ import annotations

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
from data.pipeline import DataState, build_loader
from model.autoencoder import build_autoencoder
from model.flops import dit_param_count, dit_train_flops, peak_flops
from model.text import TextEncoder
from train.budget import budget_steps
from train.build import build_bucket_table, build_dit, frozen
from train.checkpoint import Checkpointer, export
from train.config import Config, config_to_dict, register_configs, to_config
from train.ema import EMA
from train.engine import build_engine
from train.evaluate import Evaluator
from train.logger import RunLogger
from train.objectives import AutoencoderObjective, FlowMatchingObjective, video_to_float
from train.runtime import Runtime, init_runtime, seed_everything, set_rng_state, shutdown
from train.sample import generate
from train.trainer import Progress, Trainer


def _dit_sampler(config: Config, autoencoder, text_encoder, runtime: Runtime, run_dir: Path):
    cfg = config.train

    def sample(model, step: int) -> dict[str, Path]:
        videos = generate(
            model,
            autoencoder,
            text_encoder,
            config.flow,
            cfg.sample_prompts,
            cfg.sample_frames,
            cfg.sample_height,
            cfg.sample_width,
            seed=0,
            steps=cfg.sample_steps,
            autocast=runtime.autocast,
        )
        return {
            f"prompt_{i}": write_mp4(
                run_dir / "samples" / f"step_{step:08d}_prompt_{i}.mp4",
                video,
                cfg.sample_fps,
                {"prompt": prompt, "step": step},
            )
            for i, (prompt, video) in enumerate(zip(cfg.sample_prompts, videos, strict=False))
        }

    return sample


def _reconstruction_sampler(config: Config, batch, run_dir: Path):
    """Originals beside their reconstructions, for the autoencoder stage."""

    @torch.no_grad()
    def sample(model, step: int) -> dict[str, Path]:
        video = video_to_float(batch.video, next(model.parameters()).device)
        recon = model.decode(model.encode(video)).clamp(-1, 1)
        pair = torch.cat([video, recon], dim=-1)  # side by side
        frames = ((pair + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        path = run_dir / "samples" / f"step_{step:08d}_reconstruction.mp4"
        return {"reconstruction": write_mp4(path, frames[0], config.train.sample_fps)}

    return sample


def _calibrate_and_export(config: Config, trainer: Trainer, batches, run_dir: Path) -> None:
    """Autoencoder stage: set the latent normalisation on training data, then export."""
    model = trainer.engine.model
    if trainer.ema is not None:
        trainer.ema.copy_to(model)
    device = next(model.parameters()).device
    model.eval()
    model.calibrate(video_to_float(b.video, device) for b in itertools.islice(batches, 8))
    export(run_dir, model, None, config_to_dict(config))


def _evaluator(config: Config, table, objective, model, runtime: Runtime, run_dir: Path):
    """The fixed evaluation loss; its results also carry what a scaling-law fit needs."""
    facts = {
        "model": config.model.size,
        "params": dit_param_count(config.model, model.in_channels, model.text_dim),
        "budget_flops": config.train.budget_flops,
        "steps": config.train.steps,
    }
    return Evaluator(
        config.eval, config.data, table, objective, config.flow, runtime, run_dir, facts
    )


def run(config: Config) -> list[float]:
    runtime = init_runtime(config.train.device, config.train.precision)
    run_dir = Path(config.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.train.seed)  # identical initial weights on every rank
    is_dit = config.train.stage == "dit"
    if is_dit:
        autoencoder = frozen(build_autoencoder(config.autoencoder), runtime.device)
        text_encoder = frozen(TextEncoder(config.text_encoder), runtime.device)
        model = build_dit(config, autoencoder, text_encoder).to(runtime.device)
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
            config.model.patch_size,
            lambda n: flops(num_tokens=n),
        )
        if config.train.budget_flops:
            steps, _ = budget_steps(
                config.train.budget_flops,
                config.data,
                build_bucket_table(config, autoencoder),
                lambda bucket: flops(num_tokens=bucket.tokens_per_sample),
                config.train.grad_accum,
                runtime.world_size,
            )
            config = replace(config, train=replace(config.train, steps=steps))
    else:
        autoencoder = model = build_autoencoder(config.autoencoder).to(runtime.device)
        objective = AutoencoderObjective()

    engine = build_engine(config.parallel.backend, model, config.optim, config.train.steps)
    ema = EMA(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    checkpointer = Checkpointer(run_dir, config.train.keep_last, config.train.keep_every)
    restored = checkpointer.load_latest(config.train.resume, engine, ema)
    progress = Progress()
    if restored:
        trainer_state, rng = restored
        progress = Progress(
            **{k: trainer_state[k] for k in Progress.__dataclass_fields__ if k in trainer_state}
        )
    data_state = (
        DataState.from_dict(progress.data_state)
        if progress.data_state
        else DataState(seed=config.data.seed, epoch=0, consumed_samples=0)
    )
    table = build_bucket_table(config, autoencoder)
    batches = iter(build_loader(config.data, table, runtime.rank, runtime.world_size, data_state))
    evaluator = (
        _evaluator(config, table, objective, model, runtime, run_dir)
        if is_dit and config.eval.shards
        else None
    )
    # The loader's iterator draws its worker seeds from the global RNG: restore after it.
    if restored:
        set_rng_state(rng)
    else:
        seed_everything(config.train.seed + 1_000_003 * runtime.rank)

    config_values = config_to_dict(config)
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
            table,
            0,
            1,
            DataState(seed=config.data.seed + 1, epoch=0, consumed_samples=0),
        )
        sampler = _reconstruction_sampler(config, next(iter(held_out)), run_dir)
    trainer = Trainer(
        config,
        runtime,
        engine,
        objective,
        batches,
        checkpointer,
        logger,
        ema,
        progress,
        sampler if runtime.is_main else None,
        peak_flops(runtime.device),
        evaluator,
    )
    losses = trainer.fit()
    if runtime.is_main:
        if is_dit:
            export(run_dir, model, ema, config_values)
        else:
            _calibrate_and_export(config, trainer, batches, run_dir)
    logger.close()
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

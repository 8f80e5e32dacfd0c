"""Entry point: `python -m train [hydra overrides]`.

Builds the parts a run needs from its typed Config, restores the latest checkpoint of the
run directory when there is one, and trains. What differs between the stages (`dit`, with
Tessera's DiT or a pretrained Wan model, and `autoencoder`) lives in train/stages.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from data.pipeline import build_loader, open_plan
from data.plan import DataState
from model.flops import peak_flops
from train.checkpoint import Checkpointer, checkpoint_stores
from train.config import Config, config_to_dict, register_configs, to_config
from train.ema import EMA
from train.logger import RunLogger
from train.ownership import claim_run_dir
from train.parallel import ParallelDims, build_engine
from train.runtime import (
    Runtime,
    end_finished_rank,
    init_runtime,
    launch_env,
    seed_everything,
    shutdown,
)
from train.signals import PREEMPTED_MARKER, Preempted, StopSignals, die_with_agent
from train.stages import Stage, stage_type
from train.state import DataPosition
from train.trainer import Progress, Trainer


def _check_parallel(config: Config, stage: type[Stage]) -> ParallelDims:
    """The parallel layout, checked before any process group or file is made."""
    rank, world_size, _ = launch_env()
    dims = ParallelDims.resolve(config.parallel, world_size, rank)
    stage.check_layout(config, dims)
    return dims


def _engine(config: Config, model, dims: ParallelDims, runtime: Runtime):
    """The model parallelised behind its backend's engine, and its EMA (None without one)."""
    train = config.train
    engine = build_engine(
        model,
        config.parallel,
        config.optim,
        dims,
        train.grad_accum,
        train.steps,
        runtime.autocast_dtype,
    )
    ema = EMA(engine, train.ema_decay) if train.ema_decay > 0 else None
    return engine, ema


def _checkpointer(config: Config, engine, ema, dims: ParallelDims, progress, data) -> Checkpointer:
    """Every component of the run's state behind one save and load path."""
    stores = checkpoint_stores(engine, ema, progress, data, dims.layout(), config_to_dict(config))
    train = config.train
    return Checkpointer(
        train.run_dir, stores, train.keep_last, train.keep_every, train.checkpoint_async
    )


def _start_logger(
    config: Config, runtime: Runtime, dims: ParallelDims, progress: Progress, resumed_from
) -> RunLogger:
    """The run's logger, once the config (its steps final) is written beside the checkpoints."""
    config_values = config_to_dict(config)
    run_dir = Path(config.train.run_dir)
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
    if resumed_from:
        logger.print(f"resumed from step {progress.step} ({resumed_from})")
    return logger


def _fit(trainer: Trainer, runtime: Runtime, run_dir: Path) -> list[float]:
    try:
        return trainer.fit()
    except BaseException as error:
        if isinstance(error, Preempted) and runtime.is_main:
            (run_dir / PREEMPTED_MARKER).write_text(f"step {error.step} {error.signal_name}\n")
        shutdown()  # a failed or preempted run leaves no process group behind
        raise
    finally:
        trainer.stop_signals.restore()
        trainer.logger.close()


def run(config: Config) -> list[float]:
    stage_kind = stage_type(config)
    dims = _check_parallel(config, stage_kind)
    claim_run_dir(Path(config.train.run_dir))  # one live run per directory, before any work
    distributed = config.parallel.backend != "none"
    runtime = init_runtime(config.train.device, config.train.precision, distributed)
    dims.build_mesh(runtime.device.type)
    run_dir = Path(config.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.train.seed)  # identical initial weights on every rank
    stage = stage_kind(config, runtime)
    plan = open_plan(config.data, stage.table)  # once per run: the loader and the budget share it
    steps = stage.train_steps(config, plan, dims)
    config = replace(config, train=replace(config.train, steps=steps))
    engine, ema = _engine(config, stage.model, dims, runtime)
    progress = Progress()
    data = DataPosition(DataState(seed=config.data.seed, epoch=0, consumed_samples=0))
    checkpointer = _checkpointer(config, engine, ema, dims, progress, data)
    evaluator = stage.evaluator(config, dims, run_dir)
    # Each rank's own generators; a checkpoint restores them, except on a rank it has none for.
    seed_everything(config.train.seed + 1_000_003 * runtime.rank)
    resumed = checkpointer.load_latest(config.train.resume)
    batches = data.track(build_loader(config.data, plan, dims.dp_rank, dims.dp_size, data.state))
    logger = _start_logger(config, runtime, dims, progress, resumed and checkpointer.root)
    trainer = Trainer(
        config=config,
        runtime=runtime,
        dims=dims,
        engine=engine,
        objective=stage.objective,
        batches=batches,
        checkpointer=checkpointer,
        logger=logger,
        ema=ema,
        progress=progress,
        sampler=stage.sampler(config, plan, run_dir),
        peak_flops=peak_flops(runtime.device),
        stop_signals=StopSignals().install(),
        evaluator=evaluator,
    )
    losses = _fit(trainer, runtime, run_dir)
    stage.export(config, trainer.consolidated_weights(), trainer.weights_kind, batches, run_dir)
    shutdown(finished=True)
    return losses


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    if hydra_config.mode == RunMode.MULTIRUN:  # every job of a sweep gets its own directory
        cfg.train.run_dir = hydra_config.runtime.output_dir
    run(to_config(cfg))


register_configs()

if __name__ == "__main__":
    die_with_agent()
    main()
    end_finished_rank()

"""`python -m train.encode`: latent shards from pixel shards, so that training runs neither frozen
encoder (the job is data/encode_job.py; the format data/latents.py).

    python -m train.encode --out LATENTS [--dtype bfloat16] [--logvar] [--batch-size 8]
        [--samples-per-shard 512] [overrides as for training: experiment=demo autoencoder=...]

The config is composed from the same overrides as `python -m train`, so the autoencoder, text
encoder, buckets and frame rate are the run's own, and the encoders run as training runs them:
through the online latent source (train/latent_source.py), on the run's device and in its
precision. Under torchrun every rank encodes its share of the shards; rerun the same command to
resume.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch.distributed as dist
from hydra import compose, initialize_config_dir

from data.encode_job import EncodeJob, EncodeOptions
from data.latents import DTYPES
from data.pipeline import open_plan
from model.autoencoder import weight_files
from train.build import sample_table
from train.config import Config, register_configs, to_config
from train.encoders import FrozenEncoders
from train.latent_source import OnlineLatents, encoding_record, stored_latents_record
from train.runtime import end_finished_rank, init_runtime, shutdown

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return to_config(compose("config", overrides=overrides))


def run(options: EncodeOptions, overrides: list[str]) -> dict | None:
    """Encode on this rank (every rank of a torchrun job); rank 0 returns the report."""
    config = compose_config(overrides)
    if not weight_files(config.autoencoder):
        raise ValueError(
            "autoencoder.checkpoint is not set: latents of a randomly initialised autoencoder "
            "mean nothing (set it, or autoencoder=diffusers with a pretrained_path)"
        )
    if stored_latents_record(config.data.shards) is not None:
        raise ValueError(f"data.shards={config.data.shards!r} are latent shards already")
    runtime = init_runtime(config.train.device, config.train.precision)
    encoders = FrozenEncoders(config, runtime.device)
    source = OnlineLatents(encoders, config.model.patch_size, autocast=runtime.autocast)
    plan = open_plan(config.data, sample_table(config, source.geometry))
    record = encoding_record(config, source, options.dtype, options.logvar)
    job = EncodeJob(plan, config.data, options, record)
    spec = job.check_job()  # on every rank, so that all refuse together
    if runtime.is_main:
        job.start(spec)
    _barrier()
    job.encode(source, runtime.rank, runtime.world_size)
    _barrier()
    report = job.finish(source.null_caption) if runtime.is_main else None
    shutdown(finished=True)
    if report is not None:
        print(
            f"{report['samples']} samples in {report['shards']} latent shards "
            f"({report['bytes'] / 2**20:.1f} MiB) at {options.out}; "
            f"{len(report['skipped'])} skipped (report.json)"
        )
    return report


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parse_args(argv: list[str] | None) -> tuple[EncodeOptions, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m train.encode",
        description="Encode pixel shards (data.shards of the config) into latent shards: the "
        "autoencoder's latents at each sample's bucket size (middle frames, centre crop, as "
        "data.augment=false) and the caption and recaption embeddings. Run it under torchrun "
        "to encode on every GPU; rerun the same command to resume.",
        epilog="example: python -m train.encode --out .cache/demo/latents experiment=demo "
        "data.shards=.cache/demo/shards",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="the latent shard folder (local or mounted)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument(
        "--logvar", action="store_true", help="also store the posterior's log-variance"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="samples encoded together")
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument(
        "overrides", nargs="*", help="config overrides as for `python -m train` (key=value)"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.samples_per_shard < 1:
        parser.error("--batch-size and --samples-per-shard must be at least 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must be key=value, not {bad}")
    options = EncodeOptions(
        args.out, args.dtype, args.logvar, args.batch_size, args.samples_per_shard
    )
    return options, args.overrides


def main(argv: list[str] | None = None) -> dict | None:
    return run(*parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
    end_finished_rank()

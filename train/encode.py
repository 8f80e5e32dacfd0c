"""What `python -m data.encode` runs: the training config and its frozen encoders, composed with
the encoding job of data/encode.py.

The config is composed from the same overrides as `python -m train`, so the autoencoder, text
encoder, buckets and frame rate are the run's own, and the encoders run as training runs them
(the same precision, the posterior's mean as `autoencoder.encode` gives it).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from data.encode import EncodeJob, EncodeOptions
from data.latents import are_latent_shards
from data.pipeline import open_plan
from model.autoencoder import weight_files
from train.build import build_bucket_table
from train.config import Config, register_configs, to_config
from train.encoders import FrozenEncoders, encoding_record
from train.objectives import video_to_float
from train.runtime import Runtime, init_runtime, shutdown

CONF = Path(__file__).resolve().parents[1] / "conf"


class RunEncoders:
    """The run's encoders behind the two calls the job makes, on the run's device and in its
    precision; results come back to the host in float32."""

    def __init__(self, encoders: FrozenEncoders, runtime: Runtime):
        self.encoders, self.runtime = encoders, runtime

    @torch.no_grad()
    def video(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.runtime.autocast():
            video = video_to_float(clips, self.runtime.device)
            mean, logvar = self.encoders.autoencoder.posterior(video)
        return mean.float().cpu(), logvar.float().cpu()

    @torch.no_grad()
    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.runtime.autocast():
            embedding, mask = self.encoders.text_encoder.encode(captions)
        return embedding.float().cpu(), mask.cpu()


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
    if are_latent_shards(config.data.shards):
        raise ValueError(f"data.shards={config.data.shards!r} are latent shards already")
    runtime = init_runtime(config.train.device, config.train.precision)
    encoders = FrozenEncoders(config, runtime.device)
    plan = open_plan(config.data, build_bucket_table(config, encoders.autoencoder))
    record = encoding_record(config, encoders, options.dtype, options.logvar)
    job = EncodeJob(plan, config.data, options, record)
    spec = job.check_job()  # on every rank, so that all refuse together
    if runtime.is_main:
        job.start(spec)
    _barrier()
    job.encode(RunEncoders(encoders, runtime), runtime.rank, runtime.world_size)
    _barrier()
    report = job.finish(encoders.text_encoder.null_embedding()) if runtime.is_main else None
    shutdown()
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

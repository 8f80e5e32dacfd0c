"""Generate videos from a trained DiT: the sampling command and training-time samples.

    python -m train.sample checkpoint=runs/demo prompt="a rabbit in a meadow" \
        frames=17 height=64 width=96 seed=0 out=rabbit.mp4

`checkpoint` is a run directory (its export/, else its latest checkpoint), an export/
folder, or one checkpoint folder. The run's own config rebuilds the model.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from data.mp4 import write_mp4
from model.flow import FlowConfig, euler_sample


def latent_shape(autoencoder, patch: list[int], frames: int, height: int, width: int):
    """Latent (T, H, W) for a pixel size, with a clear error when the size does not fit."""
    tc, sc = autoencoder.temporal_compression, autoencoder.spatial_compression
    if (frames - 1) % tc or height % sc or width % sc:
        raise ValueError(
            f"frames={frames}, height={height}, width={width}: frames must be 1 + k*{tc} "
            f"and height, width multiples of {sc}"
        )
    shape = (1 + (frames - 1) // tc, height // sc, width // sc)
    if any(n % p for n, p in zip(shape, patch, strict=False)):
        raise ValueError(
            f"frames={frames}, height={height}, width={width} give latents {shape}, "
            f"not divisible by the patch size {tuple(patch)}"
        )
    return shape


@torch.no_grad()
def generate(
    dit,
    autoencoder,
    text_encoder,
    flow: FlowConfig,
    prompts: list[str],
    frames: int,
    height: int,
    width: int,
    seed: int = 0,
    steps: int | None = None,
    cfg_scale: float | None = None,
    autocast=nullcontext,
) -> np.ndarray:
    """Videos for `prompts` as uint8 (N, T, H, W, 3)."""
    device = next(dit.parameters()).device
    patch = list(dit.cfg.patch_size)
    lt, lh, lw = latent_shape(autoencoder, patch, frames, height, width)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), autoencoder.latent_channels, lt, lh, lw, generator=generator)
    text, mask = text_encoder.encode(prompts)
    null_text, null_mask = text_encoder.null_embedding()
    num_tokens = (lt // patch[0]) * (lh // patch[1]) * (lw // patch[2])
    with autocast():
        latents = euler_sample(
            dit,
            noise.to(device),
            text,
            mask,
            null_text,
            null_mask,
            flow,
            steps=steps,
            cfg_scale=cfg_scale,
            num_tokens=num_tokens,
        )
        video = autoencoder.decode(latents.float())
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu().numpy()


@dataclass
class SampleConfig:
    checkpoint: str = "runs/demo"
    prompt: str = "a big white cartoon rabbit in a green meadow"
    frames: int = 17
    height: int = 64
    width: int = 64
    fps: float = 8.0
    steps: int | None = None  # None: the run's flow.sample_steps
    cfg_scale: float | None = None  # None: the run's flow.cfg_scale
    seed: int = 0
    weights: str = "ema"  # ema | raw (only for checkpoint folders; export/ holds one set)
    device: str = "auto"
    out: str = "sample.mp4"


def main(argv: list[str]) -> Path:
    from train.build import load_for_sampling  # the trainer's builders, only for the command

    cli = OmegaConf.from_cli(argv)
    cfg: SampleConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(SampleConfig), cli)
    )
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if cfg.device == "auto"
        else cfg.device
    )
    parts = load_for_sampling(cfg.checkpoint, cfg.weights, device)
    video = generate(
        parts.dit,
        parts.autoencoder,
        parts.text_encoder,
        parts.config.flow,
        [cfg.prompt],
        cfg.frames,
        cfg.height,
        cfg.width,
        cfg.seed,
        cfg.steps,
        cfg.cfg_scale,
    )[0]
    provenance = {
        "generator": "tessera",
        "model": parts.config.model.size,
        "checkpoint": str(parts.source),
        "prompt": cfg.prompt,
        "seed": cfg.seed,
    }
    path = write_mp4(cfg.out, video, cfg.fps, provenance)
    print(
        f"wrote {path} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, "
        f"{cfg.fps:g} fps) from {parts.source}"
    )
    return path


if __name__ == "__main__":
    main(sys.argv[1:])

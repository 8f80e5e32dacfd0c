"""Builds a run's parts from its Config: the frozen encoders, the DiT, the bucket table,
and everything the sampling command needs to rebuild a trained model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from data.buckets import BucketTable
from model.autoencoder import build_autoencoder
from model.dit import DiT
from model.geometry import LatentGeometry
from model.text import TextEncoder
from train.checkpoint import CheckpointError, load_tensors
from train.config import Config, to_config
from train.wan import build_wan_model, load_trained


def frozen(module: nn.Module, device: torch.device) -> nn.Module:
    module.requires_grad_(False)
    return module.eval().to(device)


def build_dit(config: Config, latent_channels: int, text_dim: int) -> nn.Module:
    """Tessera's DiT from scratch, or the pretrained Wan model of config.model.wan."""
    if config.model.wan is not None:
        return build_wan_model(config, latent_channels, text_dim)
    return DiT(config.model, latent_channels, text_dim)


def model_name(config: Config) -> str:
    """How samples' provenance names the model."""
    if config.model.wan is not None:
        return f"Wan {config.model.size} from {config.model.wan.path}"
    return f"tessera DiT {config.model.size}"


def latent_geometry(config: Config, autoencoder: nn.Module) -> LatentGeometry:
    """The autoencoder's compressions and the DiT's patch. The autoencoder stage feeds pixels,
    but its batches keep the DiT's geometry so that both stages see the same buckets."""
    return LatentGeometry.of(autoencoder, config.model.patch_size)


def build_bucket_table(config: Config, autoencoder: nn.Module) -> BucketTable:
    return BucketTable(config.buckets, latent_geometry(config, autoencoder))


def config_from_dict(values: dict) -> Config:
    return to_config(OmegaConf.merge(OmegaConf.structured(Config), values))


@dataclass
class SamplingParts:
    config: Config
    dit: nn.Module  # Tessera's DiT or a Wan model
    autoencoder: nn.Module
    text_encoder: TextEncoder
    source: Path


def _find_weights(path: Path, weights: str) -> tuple[Path, dict]:
    """(weights file, config dict) of a run dir, an export/ folder or a checkpoint folder."""
    if (path / "export" / "model.safetensors").exists():
        path = path / "export"
    elif (path / "checkpoints" / "latest").exists():
        path = path / "checkpoints" / (path / "checkpoints" / "latest").read_text().strip()
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return path / "model.safetensors", json.loads((path / "config.json").read_text())
    if (path / "trainer.json").exists():
        name = (
            "ema.safetensors"
            if weights == "ema" and (path / "ema.safetensors").exists()
            else "model.safetensors"
        )
        return path / name, json.loads((path / "trainer.json").read_text())["config"]
    raise CheckpointError(
        f"checkpoint={path}: not a run directory, export/ folder or checkpoint "
        "folder (no export/model.safetensors, checkpoints/latest or trainer.json)"
    )


def load_for_sampling(checkpoint: str, weights: str, device: torch.device) -> SamplingParts:
    weights_file, values = _find_weights(Path(checkpoint), weights)
    values = {k: v for k, v in values.items() if k != "weights"}
    config = config_from_dict(values)
    autoencoder = frozen(build_autoencoder(config.autoencoder), device)
    text_encoder = frozen(TextEncoder(config.text_encoder), device)
    dit = build_dit(config, autoencoder.latent_channels, text_encoder.dim)
    try:
        load_trained(dit, load_tensors(weights_file), weights_file)
    except ValueError as error:
        raise CheckpointError(str(error)) from error
    return SamplingParts(config, frozen(dit, device), autoencoder, text_encoder, weights_file)

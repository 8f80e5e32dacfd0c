"""Builds a run's models from its Config, and loads trained weights into them: Tessera's DiT or a
pretrained Wan model (with LoRA adapters when asked), and the bucket or packing table their
latents make."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf
from torch import nn

from data.buckets import BucketTable
from data.packing import PackingTable, check_packing
from model.dit import DiT
from model.geometry import LatentGeometry
from model.pretrained import (
    PretrainedVideoModel,
    add_lora,
    freeze_untrained_experts,
    load_pretrained,
)
from train.config import Config, to_config

if TYPE_CHECKING:  # the parallel package brings DeepSpeed with it
    from train.parallel.dims import ParallelDims


def frozen(module: nn.Module, device: torch.device) -> nn.Module:
    module.requires_grad_(False)
    return module.eval().to(device)


def build_dit(config: Config, latent_channels: int, text_dim: int) -> nn.Module:
    """Tessera's DiT from scratch, or the pretrained model of config.model.pretrained."""
    if config.model.pretrained is not None:
        return build_pretrained_model(config, latent_channels, text_dim)
    return DiT(config.model, latent_channels, text_dim)


def build_pretrained_model(
    config: Config, latent_channels: int, text_dim: int
) -> PretrainedVideoModel:
    """The run's pretrained model, with the LoRA adapter of config.lora, or with only the experts
    of model.pretrained.train_experts trainable. The encoders must be the ones it was trained on."""
    pretrained = config.model.pretrained
    model = load_pretrained(config.model, pretrained)
    if model.in_channels != latent_channels:
        raise ValueError(
            f"model.pretrained.path={pretrained.path}: the transformer takes {model.in_channels} "
            f"latent channels but the autoencoder makes {latent_channels} "
            "(autoencoder.pretrained_path)"
        )
    if model.text_dim != text_dim:
        raise ValueError(
            f"model.pretrained.path={pretrained.path}: the transformer reads {model.text_dim}-d "
            f"captions but the text encoder makes {text_dim}-d ones (text_encoder.path)"
        )
    if config.lora.rank:
        lora = config.lora
        add_lora(model, lora.rank, lora.alpha or lora.rank, lora.target_modules)
    else:
        freeze_untrained_experts(model)
    return model


def load_trained(model: nn.Module, weights: dict[str, torch.Tensor], source) -> None:
    """Trained weights into a model built like the run's: all of them, or with LoRA all the
    adapters (the frozen base then comes from the pretrained folder)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = dict(model.named_parameters())  # trained weights carry no buffers
    adapted = any(".lora_" in name for name in params)
    missing = [name for name in missing if name in params and (".lora_" in name or not adapted)]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def model_name(config: Config) -> str:
    """How samples' provenance names the model."""
    if config.model.pretrained is not None:
        pretrained = config.model.pretrained
        return f"{pretrained.family} {config.model.size} from {pretrained.path}"
    return f"tessera DiT {config.model.size}"


def latent_geometry(config: Config, autoencoder: nn.Module) -> LatentGeometry:
    """The autoencoder's compressions and the DiT's patch. The autoencoder stage feeds pixels,
    but its batches keep the DiT's geometry so that both stages see the same buckets."""
    return LatentGeometry.of(autoencoder, config.model.patch_size)


def build_bucket_table(config: Config, autoencoder: nn.Module) -> BucketTable:
    return BucketTable(config.buckets, latent_geometry(config, autoencoder))


def sample_table(config: Config, geometry: LatentGeometry) -> BucketTable | PackingTable:
    """What shapes the plan cuts samples to: the packing's per-sample targets, or buckets."""
    if config.packing.enabled:
        return PackingTable(config.packing, geometry)
    return BucketTable(config.buckets, geometry)


def check_sequence_layout(config: Config, dims: ParallelDims) -> None:
    """Packing settings that cannot work with the configured autoencoder's compressions, and
    sequences (a packed sequence, or each bucket's samples) that the cp x sp ranks of a sequence
    group cannot split into equal chunks, refused before any process group exists. A pretrained
    Wan model's buckets are checked when its autoencoder's geometry is known, at the first batch."""
    geometry = LatentGeometry(
        config.autoencoder.temporal_compression,
        config.autoencoder.spatial_compression,
        tuple(config.model.patch_size),
    )
    if config.packing.enabled:
        check_packing(config.packing, geometry)
        tokens = config.packing.sequence_tokens
        dims.check_sequence(tokens, f"config key packing.sequence_tokens={tokens}")
    elif dims.sequence_size > 1 and config.model.pretrained is None:
        for bucket in BucketTable(config.buckets, geometry).buckets:
            dims.check_sequence(bucket.tokens_per_sample, f"bucket {list(bucket.shape)}")


def config_from_dict(values: dict) -> Config:
    """A run's Config from the values its checkpoint or export recorded."""
    return to_config(OmegaConf.merge(OmegaConf.structured(Config), values))

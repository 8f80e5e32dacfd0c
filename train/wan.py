"""Pretrained Wan models in a run: building one from its folder (with LoRA adapters when asked),
the dtype of its frozen weights, and its export in the diffusers layouts that other tools read."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.wan import WanVideoModel, add_lora, load_wan, merge_lora, save_lora, save_wan
from train.config import Config, LoraConfig


def build_wan_model(config: Config, latent_channels: int, text_dim: int) -> WanVideoModel:
    """The run's pretrained Wan model, with the LoRA adapter of config.lora. The encoders must be
    the ones it was trained on."""
    wan = config.model.wan
    model = load_wan(config.model, wan)
    if model.in_channels != latent_channels:
        raise ValueError(
            f"model.wan.path={wan.path}: the transformer takes {model.in_channels} latent channels "
            f"but the autoencoder makes {latent_channels} (autoencoder.pretrained_path)"
        )
    if model.text_dim != text_dim:
        raise ValueError(
            f"model.wan.path={wan.path}: the transformer reads {model.text_dim}-d captions but the "
            f"text encoder makes {text_dim}-d ones (text_encoder.path)"
        )
    if config.lora.rank:
        lora = config.lora
        add_lora(model, lora.rank, lora.alpha or lora.rank, lora.target_modules)
    return model


def cast_frozen(model: nn.Module, cfg: LoraConfig, compute_dtype: torch.dtype | None) -> None:
    """Frozen weights to bf16 when asked (auto: when training computes in bf16): they are only
    read, so half their memory costs nothing; trained ones stay fp32 for the optimizer."""
    bf16 = cfg.frozen_dtype == "bf16" or (
        cfg.frozen_dtype == "auto" and compute_dtype == torch.bfloat16
    )
    if not bf16:
        return
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)


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


def export_wan(config: Config, model: WanVideoModel, weights: dict, out: Path) -> list[Path]:
    """Write the trained model as others read it: `out/transformer/` (diffusers layout) for a
    full fine-tune, `out/lora/` (diffusers LoRA format) for an adapter, and with
    lora.merge_on_export the merged transformer too. `model` is an unsharded copy it may change."""
    load_trained(model, weights, "the trained weights")
    written = []
    if config.lora.rank:
        written.append(save_lora(model, out / "lora"))
        if not config.lora.merge_on_export:
            return written
        merge_lora(model)
    written.append(save_wan(model, out / "transformer"))
    return written

"""Pretrained models in a run: the dtype of their frozen weights, and their export in the
diffusers layouts that other tools read (train/build.py builds them and loads trained weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.pretrained import PretrainedVideoModel, merge_lora, save_lora, save_pretrained
from train.build import load_trained
from train.config import Config, LoraConfig


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


def export_pretrained(
    config: Config, model: PretrainedVideoModel, weights: dict, out: Path
) -> list[Path]:
    """Write the trained model as others read it: `out/transformer/` (and `out/transformer_2/`
    for a second expert; diffusers layout) for a full fine-tune, `out/lora/` (the family
    pipeline's LoRA format) for an adapter, and with lora.merge_on_export the merged
    transformer(s) too. `model` is an unsharded copy it may change."""
    load_trained(model, weights, "the trained weights")
    written = []
    if config.lora.rank:
        written.append(save_lora(model, out / "lora"))
        if not config.lora.merge_on_export:
            return written
        merge_lora(model)
    return [*written, *save_pretrained(model, out)]

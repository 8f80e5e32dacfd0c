"""Tiny random Wan models made with diffusers' own classes and saved with `save_pretrained`, in the
layout Wan-AI publishes (transformer/, vae/, text_encoder/, tokenizer/, scheduler/): the tests
load, train and sample them exactly like a downloaded Wan, and nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from model.pretrained import FAMILIES, PretrainedConfig, PretrainedVideoModel
from model.text import default_text_encoder_path
from train.config import ModelConfig

# Two heads of 12 (Ulysses sp=2 splits them), umT5 states of 32.
TINY_WAN = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 40,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}


def tiny_transformer(seed: int = 0, **changes) -> WanTransformer3DModel:
    """Every weight random (seed), so that no branch of a block starts closed; `changes` replace
    entries of TINY_WAN."""
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**(TINY_WAN | changes))
    with torch.no_grad():
        for param in transformer.parameters():
            param.copy_(0.2 * torch.randn_like(param))
    return transformer.eval()


def tiny_wan_model(family: str, in_channels: int, text_dim: int) -> PretrainedVideoModel:
    """The tiny transformer behind Tessera's call, built in memory (A14B: two, seeds 0 and 1;
    I2V A14B: each also reads the condition's mask and latents)."""
    shown = 4 + in_channels if FAMILIES[family].given == "channels" else 0
    experts = [
        tiny_transformer(
            seed, in_channels=in_channels + shown, out_channels=in_channels, text_dim=text_dim
        )
        for seed in range(len(FAMILIES[family].experts))
    ]
    heads, head_dim = TINY_WAN["num_attention_heads"], TINY_WAN["attention_head_dim"]
    geometry = ModelConfig(
        depth=TINY_WAN["num_layers"],
        width=heads * head_dim,
        num_heads=heads,
        pretrained=PretrainedConfig(family=family, in_channels=in_channels, text_dim=text_dim),
    )
    experts = [expert.train() for expert in experts]
    return PretrainedVideoModel(FAMILIES[family], experts, geometry, geometry.pretrained)


def tiny_pipeline(seed: int = 0) -> WanPipeline:
    """A whole Wan pipeline: the tiny transformer, a tiny Wan VAE (4x8x8, 16 channels), a tiny
    umT5 encoder over the MiniLM tokenizer (which ships in a package)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_text_encoder_path())
    text_config = transformers.UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    text_encoder = transformers.UMT5EncoderModel(text_config).eval()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_transformer(seed),
    )


def save_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    tiny_pipeline(seed).save_pretrained(folder)
    return folder


def wan_overrides(folder: Path, family: str = "wan2.1") -> list[str]:
    """Hydra overrides that make the tiny pipeline in `folder` the run's model and encoders."""
    width = TINY_WAN["num_attention_heads"] * TINY_WAN["attention_head_dim"]
    return [
        f"model.size=tiny_{family}",
        f"model.depth={TINY_WAN['num_layers']}",
        f"model.width={width}",
        f"model.num_heads={TINY_WAN['num_attention_heads']}",
        f"model.pretrained.path={folder}",
        f"model.pretrained.family={family}",
        f"model.pretrained.text_dim={TINY_WAN['text_dim']}",
        f"model.pretrained.config={{ffn_dim: {TINY_WAN['ffn_dim']}}}",
        "text_encoder.max_length=16",
    ]

"""Tiny random pretrained models of the families beside Wan 2.1/2.2 TI2V (tests/wan_models.py),
made with diffusers' own classes and saved with `save_pretrained` in the layout their publishers
use: LTX-Video (transformer/, vae/, text_encoder/, tokenizer/, scheduler/) and Wan 2.2 A14B, T2V
and I2V (two experts, transformer/ and transformer_2/, with the pipeline's boundary_ratio; I2V's
shown the given frames as 20 more input channels) and CogVideoX 1.5
(a temporal patch of 2, v-prediction on a zero-terminal-SNR DDPM schedule) and HunyuanVideo
(double- and single-stream blocks, Llama and CLIP captions)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    WanImageToVideoPipeline,
)
from wan_models import TINY_WAN, tiny_pipeline, tiny_transformer

from model.pretrained import FAMILIES, PretrainedConfig, PretrainedVideoModel
from model.text import default_text_encoder_path
from train.config import ModelConfig

TEXT_DIM = 32
TINY_LTX = {
    "in_channels": 8,
    "out_channels": 8,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "cross_attention_dim": 24,
    "num_layers": 2,
    "caption_channels": TEXT_DIM,
}
LTX_STRIDE = (8, 32, 32)  # the tiny VAE's (time, height, width) compression, as the real one's


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random, so that no zero-initialised branch hides a wrong input."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.2 * torch.randn_like(param))
    return module.eval()


def tiny_t5(tokenizer) -> transformers.T5EncoderModel:
    """A one-layer T5 encoder over `tokenizer`, of TEXT_DIM (LTX-Video's and CogVideoX's)."""
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return transformers.T5EncoderModel(config).eval()


def tiny_ltx_transformer(seed: int = 0) -> LTXVideoTransformer3DModel:
    return randomised(LTXVideoTransformer3DModel(**TINY_LTX), seed)


def in_memory(
    model_class, sizes: dict, pretrained: PretrainedConfig, depth: int, patch_size: list[int],
    schedule: torch.Tensor | None = None,
) -> PretrainedVideoModel:  # fmt: skip
    """A tiny transformer of `sizes` (every weight random, training) behind Tessera's call."""
    transformer = randomised(model_class(**sizes), seed=0).train()
    heads, head_dim = sizes["num_attention_heads"], sizes["attention_head_dim"]
    geometry = ModelConfig(
        depth=depth, width=heads * head_dim, num_heads=heads, patch_size=patch_size,
        pretrained=pretrained,
    )  # fmt: skip
    family = FAMILIES[pretrained.family]
    return PretrainedVideoModel(family, [transformer], geometry, pretrained, schedule)


def tiny_ltx_model(in_channels: int, text_dim: int) -> PretrainedVideoModel:
    """The tiny LTX-Video transformer behind Tessera's call, built in memory, training."""
    sizes = TINY_LTX | {
        "in_channels": in_channels, "out_channels": in_channels, "caption_channels": text_dim
    }  # fmt: skip
    pretrained = PretrainedConfig(
        family="ltx_video", in_channels=in_channels, text_dim=text_dim,
        latent_stride=list(LTX_STRIDE),
    )  # fmt: skip
    return in_memory(
        LTXVideoTransformer3DModel, sizes, pretrained, TINY_LTX["num_layers"], [1, 1, 1]
    )


def tiny_ltx_pipeline(seed: int = 0) -> LTXPipeline:
    """A whole LTX-Video pipeline: the tiny transformer, a tiny LTX VAE (8x32x32, 8 channels), a
    tiny T5 encoder over the MiniLM tokenizer (which ships in a package)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
    )  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_text_encoder_path())
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=tiny_t5(tokenizer),
        tokenizer=tokenizer,
        transformer=tiny_ltx_transformer(seed),
    )


def ltx_overrides(folder: Path) -> list[str]:
    """Hydra overrides that make the tiny LTX pipeline in `folder` the run's model and encoders."""
    width = TINY_LTX["num_attention_heads"] * TINY_LTX["attention_head_dim"]
    return [
        "experiment=ltx_finetune",
        "model.size=tiny_ltx_video",
        f"model.depth={TINY_LTX['num_layers']}",
        f"model.width={width}",
        f"model.num_heads={TINY_LTX['num_attention_heads']}",
        f"model.pretrained.path={folder}",
        f"model.pretrained.in_channels={TINY_LTX['in_channels']}",
        f"model.pretrained.text_dim={TEXT_DIM}",
        f"model.pretrained.config={{cross_attention_dim: {TINY_LTX['cross_attention_dim']}}}",
        "text_encoder.max_length=16",
        # Buckets for a 32x spatial stride, two samples of 8 tokens a batch.
        "buckets.buckets=[[9,64,64],[9,64,96],[9,96,64],[1,64,64]]",
        "buckets.token_budget=16",
        "buckets.max_aspect_change=0.3",
    ]


def save_tiny_a14b(folder: Path) -> Path:
    """Wan 2.2 A14B's layout: the tiny Wan pipeline with a second expert (other weights) and
    the boundary between them."""
    pipeline = tiny_pipeline()
    pipeline.register_modules(transformer_2=tiny_transformer(seed=1))
    pipeline.register_to_config(boundary_ratio=0.875)
    pipeline.save_pretrained(folder)
    return folder


WAN_I2V_CHANNELS = 16 + 4 + 16  # noisy latents, the mask of given pixel frames, their latents


def save_tiny_wan_i2v_a14b(folder: Path) -> Path:
    """Wan 2.2 I2V A14B's layout: WanImageToVideoPipeline with two experts of 36 input channels,
    no image encoder, and its boundary of 0.9."""
    wan = tiny_pipeline()
    pipeline = WanImageToVideoPipeline(
        tokenizer=wan.tokenizer, text_encoder=wan.text_encoder, vae=wan.vae,
        scheduler=wan.scheduler,
        transformer=tiny_transformer(seed=0, in_channels=WAN_I2V_CHANNELS),
        transformer_2=tiny_transformer(seed=1, in_channels=WAN_I2V_CHANNELS),
        boundary_ratio=0.9,
    )  # fmt: skip
    pipeline.save_pretrained(folder)
    return folder


def a14b_overrides(folder: Path, experiment: str = "wan_finetune") -> list[str]:
    """The tiny A14B in `folder` as the run's model: T2V (wan_finetune), or with
    experiment=wan_i2v_finetune the I2V one."""
    heads, head_dim = TINY_WAN["num_attention_heads"], TINY_WAN["attention_head_dim"]
    model = {"wan_finetune": "wan2.2_t2v_a14b", "wan_i2v_finetune": "wan2.2_i2v_a14b"}[experiment]
    return [
        f"experiment={experiment}",
        f"model={model}",
        f"model.size=tiny_{model}",
        f"model.depth={TINY_WAN['num_layers']}",
        f"model.width={heads * head_dim}",
        f"model.num_heads={heads}",
        f"model.pretrained.path={folder}",
        f"model.pretrained.text_dim={TINY_WAN['text_dim']}",
        f"model.pretrained.config={{ffn_dim: {TINY_WAN['ffn_dim']}}}",
        "text_encoder.max_length=16",
    ]


# CogVideoX 1.5's layout at a tiny size: patches of 2x2x2, rotary positions sliced from a table
# of its 8x8 (latent) training size.
TINY_COGVIDEOX = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 8,
    "text_embed_dim": TEXT_DIM,
    "num_layers": 2,
    "sample_width": 8,
    "sample_height": 8,
    "sample_frames": 9,
    "patch_size": 2,
    "patch_size_t": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 16,
    "use_rotary_positional_embeddings": True,
    "patch_bias": False,
}


def tiny_cogvideox_pipeline(seed: int = 0) -> CogVideoXPipeline:
    """A whole CogVideoX 1.5 pipeline: the tiny transformer, a tiny CogVideoX VAE (4x8x8, 4
    channels), a tiny T5 over the MiniLM tokenizer, and CogVideoX 1.5's scheduler settings."""
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, scaling_factor=0.7,
    )  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_text_encoder_path())
    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=1.0,
        timestep_spacing="trailing", clip_sample=False,
    )  # fmt: skip
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5(tokenizer),
        vae=vae.eval(),
        transformer=randomised(CogVideoXTransformer3DModel(**TINY_COGVIDEOX), seed),
        scheduler=scheduler,
    )


def tiny_cogvideox_model(in_channels: int, text_dim: int) -> PretrainedVideoModel:
    """The tiny CogVideoX 1.5 transformer behind Tessera's call, built in memory, training, with
    CogVideoX 1.5's schedule."""
    sizes = TINY_COGVIDEOX | {
        "in_channels": in_channels, "out_channels": in_channels, "text_embed_dim": text_dim
    }  # fmt: skip
    pretrained = PretrainedConfig(
        family="cogvideox", in_channels=in_channels, text_dim=text_dim,
        config={"sample_height": 8, "sample_width": 8},
    )  # fmt: skip
    schedule = tiny_cogvideox_pipeline().scheduler.alphas_cumprod.float()
    return in_memory(CogVideoXTransformer3DModel, sizes, pretrained, 2, [2, 2, 2], schedule)


def cogvideox_overrides(folder: Path) -> list[str]:
    """Hydra overrides that make the tiny CogVideoX pipeline in `folder` the run's model."""
    heads, head_dim = TINY_COGVIDEOX["num_attention_heads"], TINY_COGVIDEOX["attention_head_dim"]
    return [
        "experiment=cogvideox_finetune",
        "model.size=tiny_cogvideox",
        f"model.depth={TINY_COGVIDEOX['num_layers']}",
        f"model.width={heads * head_dim}",
        f"model.num_heads={heads}",
        f"model.pretrained.path={folder}",
        f"model.pretrained.in_channels={TINY_COGVIDEOX['in_channels']}",
        f"model.pretrained.text_dim={TEXT_DIM}",
        f"model.pretrained.config={{time_embed_dim: {TINY_COGVIDEOX['time_embed_dim']}}}",
        "text_encoder.max_length=16",
        # Latent frames in pairs (a temporal patch of 2): 5 and 13 pixel frames, no stills.
        "buckets.buckets=[[5,64,64],[5,48,64],[5,64,48],[13,48,64]]",
        "buckets.token_budget=96",
    ]


# HunyuanVideo at a tiny size: one double-stream and one single-stream block, a tiny Llama (its
# states come from the third-last of 3 layers) and a tiny CLIP whose pooled vector is 16-d.
TINY_HUNYUAN = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "num_layers": 1,
    "num_single_layers": 1,
    "num_refiner_layers": 1,
    "patch_size": 2,
    "patch_size_t": 1,
    "text_embed_dim": TEXT_DIM,
    "pooled_projection_dim": 16,
    "rope_axes_dim": (4, 4, 4),
}
# The tiny tokenizer's count of the prompt template's tokens before the caption (Llama 3's: 95).
HUNYUAN_TEMPLATE_CROP = 131


def tiny_hunyuan_model(in_channels: int, text_dim: int) -> PretrainedVideoModel:
    """The tiny HunyuanVideo transformer behind Tessera's call, built in memory, training; its
    pooled caption vector is the text's width (the summary token carries it whole)."""
    sizes = TINY_HUNYUAN | {
        "in_channels": in_channels, "out_channels": in_channels, "text_embed_dim": text_dim,
        "pooled_projection_dim": text_dim,
    }  # fmt: skip
    pretrained = PretrainedConfig(
        family="hunyuan_video", in_channels=in_channels, text_dim=text_dim,
        config={"num_layers": 1, "num_single_layers": 1},
    )  # fmt: skip
    return in_memory(HunyuanVideoTransformer3DModel, sizes, pretrained, 2, [1, 2, 2])


def tiny_hunyuan_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2,
    )  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_text_encoder_path())
    llama = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    clip = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return HunyuanVideoPipeline(
        text_encoder=randomised(transformers.LlamaModel(llama), seed),
        tokenizer=tokenizer,
        transformer=randomised(HunyuanVideoTransformer3DModel(**TINY_HUNYUAN), seed),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=transformers.CLIPTextModel(clip).eval(),
        tokenizer_2=tokenizer,
    )


def hunyuan_overrides(folder: Path) -> list[str]:
    heads, head_dim = TINY_HUNYUAN["num_attention_heads"], TINY_HUNYUAN["attention_head_dim"]
    return [
        "experiment=hunyuan_video_finetune",
        "model.size=tiny_hunyuan_video",
        "model.depth=2",
        f"model.width={heads * head_dim}",
        f"model.num_heads={heads}",
        f"model.pretrained.path={folder}",
        f"model.pretrained.in_channels={TINY_HUNYUAN['in_channels']}",
        f"model.pretrained.text_dim={TEXT_DIM}",
        "model.pretrained.config={num_layers: 1, num_single_layers: 1, pooled_projection_dim: 16}",
        "text_encoder.max_length=17",
        f"text_encoder.template_crop={HUNYUAN_TEMPLATE_CROP}",
        "buckets.token_budget=96",
    ]

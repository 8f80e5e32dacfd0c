"""Bytes per GPU of fine-tuning a pretrained model preset with FSDP2, switch by switch: the
arithmetic behind the README's advice for each family's published size (Wan 2.1 14B on 8 GPUs of
80 GB, and so on).

    python -m bench.pretrained_memory [--model all|wan2.1_t2v_14b|...] [--gpus 8] [--gpu-gib 80]
        [--frames 81 --height 480 --width 832] [--sp 1] [--lora-rank 32]

Parameters are counted exactly, on the family's diffusers transformer built on the meta device
from the preset's sizes, times its experts (nothing is allocated or downloaded); the tokens come
from the preset's autoencoder stride and patch. What a rank holds:

- sharded state (1/gpus each): trained weights fp32 (4 B), their gradients fp32 (4 B), AdamW's two
  moments (8 B); frozen weights (LoRA's base) 2 B in bf16 (lora.frozen_dtype) or 4 B. With
  parallel.cpu_offload=true (FSDP2's CPUOffloadPolicy) all of it lives in host memory and the
  optimizer steps there (the `host` column);
- gathered weights: FSDP2 all-gathers one block in bf16 at a time and prefetches the next: 2 blocks
  (of one expert: a sample runs through one);
- activations, estimated per token of a sample (tokens / sp with Ulysses) in bf16: a block keeps
  about 15 widths and 2 MLP widths for its backward, plus its 3 fp32 LayerNorm inputs (measured
  on Wan's block; the other families' blocks are of the same make, their captions' tokens are
  not counted).
  Without checkpointing every block keeps them; with parallel.activation_checkpointing=full each
  block keeps only its input (one width) and one block at a time is recomputed.
Attention is memory-efficient (flash / SDPA: no tokens^2 matrix). The CUDA allocator's
fragmentation, NCCL buffers and the frozen encoders (run them before, or cache their outputs:
train.encoding_cache_mb) are not counted: leave ~10% headroom.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from model.pretrained import PretrainedConfig, expected_config, family_of

GIB = 2**30
CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def preset(name: str):
    """The model preset conf/model/<name>.yaml (geometry and Wan sizes)."""
    from train.config import ModelConfig

    values = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml")
    )
    return OmegaConf.to_object(values)


def meta_transformer(geometry, pretrained: PretrainedConfig) -> nn.Module:
    """The family's diffusers transformer at the preset's sizes (one expert), with no storage
    behind its weights."""
    import diffusers

    sizes = expected_config(geometry, pretrained)
    if isinstance(sizes["patch_size"], list):
        sizes["patch_size"] = tuple(sizes["patch_size"])
    with torch.device("meta"):
        return getattr(diffusers, family_of(pretrained).transformer)(**sizes)


def lora_param_count(transformer: nn.Module, rank: int, targets: list[str]) -> int:
    """Parameters of rank-r adapters on the Linear layers whose names end with a target (peft's
    matching rule): r (in + out) each."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear)
        and any(name == t or name.endswith(f".{t}") for t in targets)
    )


@dataclass
class Plan:
    name: str
    lora: bool
    checkpointing: bool
    cpu_offload: bool
    frozen_bf16: bool = True


def bytes_per_gpu(
    plan: Plan, counts: dict, tokens: int, gpus: int
) -> tuple[dict[str, float], float]:
    """Bytes on each GPU by kind, and bytes each rank keeps in host memory."""
    trained = counts["lora"] if plan.lora else counts["trained"]
    frozen = counts["total"] - (0 if plan.lora else counts["trained"])
    width, ffn, depth = counts["width"], counts["ffn"], counts["depth"]
    per_token_block = (15 * width + 2 * ffn) * 2 + 3 * width * 4
    if plan.checkpointing:
        activations = depth * tokens * width * 2 + tokens * per_token_block
    else:
        activations = depth * tokens * per_token_block
    sharded = {
        "weights": (4 * trained + (2 if plan.frozen_bf16 else 4) * frozen) / gpus,
        "gradients": 4 * trained / gpus,
        "optimizer": 8 * trained / gpus,
    }
    on_gpu = {name: 0.0 if plan.cpu_offload else value for name, value in sharded.items()}
    return on_gpu | {
        "gathered blocks": 2 * 2 * counts["block"],
        "activations": activations,
    }, sum(sharded.values()) if plan.cpu_offload else 0.0


def pretrained_presets() -> list[str]:
    """The conf/model presets of pretrained models."""
    return sorted(path.stem for path in CONF.glob("*.yaml") if "pretrained" in OmegaConf.load(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all", help="a conf/model preset, or all of them")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--sp", type=int, default=1, help="Ulysses degree: tokens per GPU / sp")
    parser.add_argument("--lora-rank", type=int, default=32)
    args = parser.parse_args()

    for name in pretrained_presets() if args.model == "all" else [args.model]:
        report(name, args)


def report(name: str, args: argparse.Namespace) -> None:
    from model.geometry import LatentGeometry

    geometry = preset(name)
    pretrained = geometry.pretrained
    family = family_of(pretrained)
    transformer = meta_transformer(geometry, pretrained)
    temporal, spatial, _ = pretrained.latent_stride
    latent_geometry = LatentGeometry(temporal, spatial, tuple(geometry.patch_size))
    # Latent frames rounded up to whole temporal patches, as CogVideoX 1.5's pipeline pads them.
    patch_t = geometry.patch_size[0]
    latent_frames = -(-(1 + (args.frames - 1) // temporal) // patch_t) * patch_t
    frames = 1 + temporal * (latent_frames - 1)
    tokens = latent_geometry.tokens(frames, args.height, args.width) // args.sp
    experts = len(family.experts)
    trained_experts = len(pretrained.train_experts) if experts > 1 else 1
    per_expert = sum(p.numel() for p in transformer.parameters())
    counts = {
        "total": experts * per_expert,
        "trained": trained_experts * per_expert,
        "lora": trained_experts
        * lora_param_count(transformer, args.lora_rank, family.lora_targets),
        "block": per_expert / geometry.depth,
        "width": geometry.width,
        "ffn": round(geometry.mlp_ratio * geometry.width),
        "depth": geometry.depth,
    }
    print(
        f"\n{name} ({family.name}): {counts['total'] / 1e9:.2f}B parameters"
        + (f" in {experts} experts" if experts > 1 else "")
        + f"; LoRA rank {args.lora_rank}: {counts['lora'] / 1e6:.1f}M. One sample of "
        f"{frames}x{args.height}x{args.width} = {tokens} tokens per GPU (sp={args.sp}), "
        f"FSDP2 over {args.gpus} GPUs of {args.gpu_gib:g} GiB, bf16 compute (GiB per GPU):"
    )
    plans = [
        Plan("full FT", lora=False, checkpointing=False, cpu_offload=False),
        Plan("full FT +AC", lora=False, checkpointing=True, cpu_offload=False),
        Plan("full FT +AC +offload", lora=False, checkpointing=True, cpu_offload=True),
        Plan(
            "LoRA, frozen fp32",
            lora=True,
            checkpointing=False,
            cpu_offload=False,
            frozen_bf16=False,
        ),
        Plan("LoRA +AC, frozen bf16", lora=True, checkpointing=True, cpu_offload=False),
    ]
    parts = list(bytes_per_gpu(plans[0], counts, tokens, args.gpus)[0])
    header = "".join(f"{part:>16}" for part in parts)
    print(f"{'':24}{header}{'total':>8}  fits{'host':>8}")
    for plan in plans:
        values, host = bytes_per_gpu(plan, counts, tokens, args.gpus)
        total = sum(values.values())
        fits = "yes" if total <= 0.9 * args.gpu_gib * GIB else "no"
        row = "".join(f"{v / GIB:16.1f}" for v in values.values())
        print(f"{plan.name:24}{row}{total / GIB:8.1f}  {fits:>4}{host / GIB:8.1f}")


if __name__ == "__main__":
    main()

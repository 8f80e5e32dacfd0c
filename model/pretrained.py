"""Pretrained diffusers video transformers as Tessera velocity models: Wan 2.1, Wan 2.2 TI2V,
Wan 2.2 A14B (T2V and I2V), LTX-Video, HunyuanVideo 1.0 and CogVideoX (1.0 and 1.5), through one
adapter.

`PretrainedVideoModel` composes diffusers' own transformer classes instead of copying them: the
weights of a published `-Diffusers` folder load without renaming, a result saves back in the same
layout, and numerics are diffusers' by construction. What differs from family to family is a small
declared `Family`:

- `transformer`: the diffusers class its folder holds, and `experts`, the pipeline's attribute
  names of the transformers it is made of: one, or Wan 2.2 A14B's two, chosen by noise level
  (`transformer` at or above the pipeline's boundary, `transformer_2` below it);
- `time`: one time per sample, or one per token (the given frames of an i2v, extend or connect
  sample then stay clean at time 0, exactly Tessera's frame conditioning);
- `given`: how given frames reach it: by that time per token, or (Wan 2.2 I2V A14B) as extra input
  channels, the pipeline's mask of given pixel frames and the latents of the clip with every other
  pixel frame zero (`channel_condition`), every latent frame then noised and denoised; a family
  with one time per sample and no such channels takes no given frames;
- `call`: how the trainer's call `model(x, t, text, text_mask, given=..., fps=...)` becomes the
  class's forward (the latent layout, how the caption's padding is hidden, the rotary scale);
- `geometry`: which of the folder's config.json values the preset's DiT geometry pins;
- `blocks`: the block lists that FSDP2, activation checkpointing and compile wrap;
- `pipeline`: the diffusers pipeline whose LoRA format the export writes and that loads it;
- `lora_targets`: the layers a LoRA adapts unless lora.target_modules names others.

Flow convention: Wan, LTX-Video and Tessera agree (x_t = (1 - t) x0 + t noise, the model predicts
noise - x0) and read the time on a 0..1000 scale. CogVideoX predicts v on a DDPM schedule
(x_tau = sqrt(a) x0 + sqrt(1 - a) noise, v = sqrt(a) noise - sqrt(1 - a) x0, a the schedule's
alphas_cumprod at step tau): the two paths are the same up to a scale, so flow time t is the
step tau whose sqrt(1 - a) / sqrt(a) is t / (1 - t) (interpolated between the schedule's steps,
clamped to its ends), the model reads x_t / n with n = sqrt((1 - t)^2 + t^2), and its v becomes
the flow velocity (2t - 1) / n^2 x_t + v / n. Micro-conditions: LTX-Video's rotary positions are
scaled by the frame rate (`fps`, 25 when none is given, as its pipeline's default); the others
ignore them. HunyuanVideo reads two captions, Llama's states and CLIP's pooled vector: its text
encoder (model/text.py, kind hunyuan_video) hands them over as one tensor, the states followed
by a summary token holding the pooled vector, which its call splits again; it is told the
embedded guidance `guidance` (it is guidance-distilled). Adding a family is a `Family` here and a
preset in conf/model/.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.conditioning import MODES
from model.geometry import token_grid

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
TIME_SCALE = 1000.0  # the transformers' timestep for flow time t is 1000 t
LTX_DEFAULT_FPS = 25.0  # LTXPipeline's frame_rate


@dataclass
class PretrainedConfig:
    """Where a pretrained transformer comes from and what it must be. The geometry (depth,
    width, heads, patch) is the model config's own; these are the sizes it does not have."""

    family: str = "wan2.1"  # a key of FAMILIES
    path: str | None = None  # local diffusers folder: a pipeline (with transformer/) or its own
    in_channels: int = 16  # latent channels of the autoencoder it was trained with
    text_dim: int = 4096  # the text encoder's hidden size
    # Further values of the folder's config.json that the preset pins (its published size).
    config: dict[str, Any] = field(default_factory=dict)
    # Experts (Wan 2.2 A14B): the noise level from which `transformer` denoises, the pipeline's
    # boundary_ratio (0.875 for T2V), and which experts train (the others stay frozen).
    boundary: float = 0.875
    train_experts: list[str] = field(default_factory=lambda: ["transformer", "transformer_2"])
    # The (time, height, width) compression of the autoencoder it was trained with: LTX-Video's
    # rotary positions are scaled by it, and bench/pretrained_memory.py counts tokens with it.
    latent_stride: list[int] = field(default_factory=lambda: [4, 8, 8])
    # HunyuanVideo: the embedded guidance scale it is told (fine-tuners train it at 1; its
    # pipeline samples at 6).
    guidance: float = 1.0


class PretrainedFolderError(ValueError):
    """A model folder is missing a file or holds another model; the message names the file."""


@dataclass(frozen=True)
class Call:
    """One forward of one transformer, in the trainer's terms."""

    x: Tensor  # (B, C, T, H, W) latents
    timestep: Tensor  # (B,) or (B, tokens), on the 0..1000 scale
    text: Tensor  # (B, L, D)
    text_mask: Tensor  # (B, L) bool
    fps: Tensor | None  # (B,)
    patch_size: tuple[int, int, int]
    cfg: PretrainedConfig
    alphas_cumprod: Tensor | None = None  # the DDPM schedule of a v-prediction family
    condition: Tensor | None = None  # (B, C', T, H, W) extra input channels (channel_condition)


@dataclass(frozen=True)
class Family:
    name: str
    transformer: str  # diffusers class name
    pipeline: str  # diffusers pipeline class name (LoRA format, export)
    time: str  # "sample" | "token"
    call: Callable[[nn.Module, Call], Tensor]
    geometry: Callable[[Any, PretrainedConfig], dict]  # the config.json values a preset pins
    blocks: tuple[str, ...]
    experts: tuple[str, ...] = ("transformer",)
    # How train/parallel/sequence.py splits its tokens over sequence-parallel ranks ("wan",
    # "ltx", "hunyuan", "cogvideox": a counterpart of that attention processor exists); None: it
    # cannot. `ring`: the split also goes round a ring (parallel.cp); False: Ulysses only.
    sequence_split: str | None = None
    ring: bool = True
    lora_targets: tuple[str, ...] = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    )
    # "flow" (predicts noise - x0) | "v" (v-prediction on the DDPM schedule of its scheduler/)
    prediction: str = "flow"
    # The text_encoder.kind (model/text.py) its captions need; auto: any one encoder.
    text_encoder: str = "auto"
    # "time" (given frames stay clean at time 0: a family with one time per token) | "channels"
    # (given pixel frames as extra input channels, channel_condition); with one time per sample
    # and no such channels it takes none
    given: str = "time"

    @property
    def conditioning_modes(self) -> tuple[str, ...]:
        """The training modes of model/conditioning.py it can take."""
        if self.given == "channels":  # its pipeline's image, and first and last image
            return ("i2v", "connect")
        if self.given == "time" and self.time == "token":
            return MODES
        return ("t2v",)


def _wan_call(transformer: nn.Module, call: Call) -> Tensor:
    """Wan's pipelines feed the caption's states with the padding zeroed and no mask."""
    context = call.text * call.text_mask[..., None].to(call.text.dtype)
    x = call.x if call.condition is None else torch.cat([call.x, call.condition], dim=1)
    return transformer(
        hidden_states=x,
        timestep=call.timestep,
        encoder_hidden_states=context,
        return_dict=False,
    )[0]


def _geometry(geometry, cfg: PretrainedConfig) -> dict:
    """What every family's config.json says of the preset's heads and channels."""
    return {
        "num_attention_heads": geometry.num_heads,
        "attention_head_dim": geometry.width // geometry.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
    }


def _square_patch(geometry, family: str) -> tuple[int, int]:
    """(time, side) of a family whose patches are square in space."""
    patch_t, patch_h, patch_w = geometry.patch_size
    if patch_h != patch_w:
        raise ValueError(f"{family} patches are square, got model.patch_size={geometry.patch_size}")
    return patch_t, patch_h


def _wan_geometry(geometry, cfg: PretrainedConfig) -> dict:
    return _geometry(geometry, cfg) | {
        "num_layers": geometry.depth,
        "text_dim": cfg.text_dim,
        "patch_size": list(geometry.patch_size),
    }


def _wan_i2v_geometry(geometry, cfg: PretrainedConfig) -> dict:
    """Its input is the noisy latents, then the condition's mask and latents."""
    return _wan_geometry(geometry, cfg) | {
        "in_channels": 2 * cfg.in_channels + cfg.latent_stride[0]
    }


def _ltx_call(transformer: nn.Module, call: Call) -> Tensor:
    """LTX-Video takes tokens (B, N, C pt ph pw), channels last within a patch, the caption's
    mask, and rotary positions scaled by the autoencoder's stride over the frame rate."""
    batch, channels = call.x.shape[:2]
    grid = token_grid(call.x.shape[2:], call.patch_size)
    stride_t, stride_h, stride_w = call.cfg.latent_stride
    fps = call.fps if call.fps is not None else torch.full((batch,), LTX_DEFAULT_FPS)
    per_sample = (stride_t / fps.to(call.x.device, torch.float32)).view(batch, 1, 1, 1, 1)
    tokens = transformer(
        hidden_states=_to_tokens(call.x, call.patch_size),
        encoder_hidden_states=call.text,
        timestep=call.timestep,
        encoder_attention_mask=call.text_mask,
        num_frames=grid[0],
        height=grid[1],
        width=grid[2],
        rope_interpolation_scale=(per_sample, stride_h, stride_w),
        return_dict=False,
    )[0]
    return _from_tokens(tokens, grid, call.patch_size, channels)


def _ltx_geometry(geometry, cfg: PretrainedConfig) -> dict:
    patch_t, patch = _square_patch(geometry, "LTX-Video")
    return _geometry(geometry, cfg) | {
        "num_layers": geometry.depth,
        "caption_channels": cfg.text_dim,
        "patch_size": patch,
        "patch_size_t": patch_t,
    }


def _to_tokens(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, C, T, H, W) to (B, tokens, C pt ph pw), tokens frame-major, channels first in a patch."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def _from_tokens(
    tokens: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int
) -> Tensor:
    (gt, gh, gw), (pt, ph, pw) = grid, patch
    x = tokens.reshape(tokens.shape[0], gt, gh, gw, channels, pt, ph, pw)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(
        tokens.shape[0], channels, gt * pt, gh * ph, gw * pw
    )


def _hunyuan_call(transformer: nn.Module, call: Call) -> Tensor:
    """HunyuanVideo: the caption's Llama states and mask, and CLIP's pooled vector from the
    summary token its text encoder appends (zero-padded to the states' width)."""
    config = transformer.config
    guidance = None
    if config.guidance_embeds:
        guidance = torch.full_like(call.timestep, call.cfg.guidance * TIME_SCALE)
    return transformer(
        hidden_states=call.x,
        timestep=call.timestep,
        encoder_hidden_states=call.text[:, :-1],
        encoder_attention_mask=call.text_mask[:, :-1],
        pooled_projections=call.text[:, -1, : config.pooled_projection_dim],
        guidance=guidance,
        return_dict=False,
    )[0]


def _hunyuan_geometry(geometry, cfg: PretrainedConfig) -> dict:
    """Its depth is its double-stream plus its single-stream blocks: the preset's config pins how
    many of each."""
    patch_t, patch = _square_patch(geometry, "HunyuanVideo")
    return _geometry(geometry, cfg) | {
        "text_embed_dim": cfg.text_dim,
        "patch_size": patch,
        "patch_size_t": patch_t,
    }


def _cogvideox_call(transformer: nn.Module, call: Call) -> Tensor:
    """CogVideoX takes frames before channels, the caption's states as they are (its pipelines
    give no mask: text and video attend jointly over every caption token), one step per sample,
    and rotary positions as its pipelines make them; it predicts v, which becomes the velocity."""
    t = call.timestep.double() / TIME_SCALE
    norm = ((1 - t) ** 2 + t**2).sqrt()
    step = _schedule_step(call.alphas_cumprod.double(), ((1 - t) / norm) ** 2)

    def per_sample(values: Tensor) -> Tensor:
        return values.to(call.x.dtype).view(-1, 1, 1, 1, 1)

    v = transformer(
        hidden_states=(call.x / per_sample(norm)).transpose(1, 2),
        encoder_hidden_states=call.text,
        timestep=step.to(call.x.dtype),
        image_rotary_emb=_cogvideox_rotary(transformer, call.x.shape[2:], call.x.device),
        return_dict=False,
    )[0].transpose(1, 2)
    return per_sample((2 * t - 1) / norm**2) * call.x + v / per_sample(norm)


def _schedule_step(alphas_cumprod: Tensor, alpha: Tensor) -> Tensor:
    """The continuous step tau at which the (decreasing) schedule reaches `alpha`, linear
    between its steps and clamped to its ends."""
    rising = alphas_cumprod.flip(0)
    alpha = alpha.clamp(rising[0], rising[-1])
    upper = torch.searchsorted(rising, alpha).clamp(1, len(rising) - 1)
    low, high = rising[upper - 1], rising[upper]
    position = upper - 1 + (alpha - low) / (high - low).clamp_min(torch.finfo(high.dtype).tiny)
    return len(rising) - 1 - position


def _cogvideox_rotary(transformer: nn.Module, latent_shape, device) -> tuple[Tensor, Tensor] | None:
    """The rotary table CogVideoX's pipelines make: cropped to the sample's grid (1.0), or sliced
    from a table of the training size (1.5, with a temporal patch)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    config = transformer.config
    if not config.use_rotary_positional_embeddings:
        return None
    frames, height, width = latent_shape
    patch, patch_t = config.patch_size, config.patch_size_t
    grid = (height // patch, width // patch)
    base = (config.sample_height // patch, config.sample_width // patch)
    if patch_t is None:
        crops = get_resize_crop_region_for_grid(grid, base[1], base[0])
        return get_3d_rotary_pos_embed(
            config.attention_head_dim, crops, grid, frames, device=device
        )
    return get_3d_rotary_pos_embed(
        config.attention_head_dim, None, grid, -(-frames // patch_t), grid_type="slice",
        max_size=base, device=device,
    )  # fmt: skip


def _cogvideox_geometry(geometry, cfg: PretrainedConfig) -> dict:
    patch_t, patch = _square_patch(geometry, "CogVideoX")
    return _geometry(geometry, cfg) | {
        "num_layers": geometry.depth,
        "text_embed_dim": cfg.text_dim,
        "patch_size": patch,
        "patch_size_t": patch_t if patch_t > 1 else None,  # 1.0 has none, 1.5 has 2
    }


WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("wan2.1", "WanTransformer3DModel", "WanPipeline", "sample", _wan_call,
               _wan_geometry, ("blocks",), sequence_split="wan", lora_targets=WAN_LORA_TARGETS),
        Family("wan2.2_ti2v", "WanTransformer3DModel", "WanPipeline", "token", _wan_call,
               _wan_geometry, ("blocks",), sequence_split="wan", lora_targets=WAN_LORA_TARGETS),
        Family("wan2.2_a14b", "WanTransformer3DModel", "WanPipeline", "sample", _wan_call,
               _wan_geometry, ("blocks",), experts=("transformer", "transformer_2"),
               sequence_split="wan", lora_targets=WAN_LORA_TARGETS),
        Family("wan2.2_i2v_a14b", "WanTransformer3DModel", "WanImageToVideoPipeline", "sample",
               _wan_call, _wan_i2v_geometry, ("blocks",), experts=("transformer", "transformer_2"),
               sequence_split="wan", lora_targets=WAN_LORA_TARGETS, given="channels"),
        Family("ltx_video", "LTXVideoTransformer3DModel", "LTXPipeline", "token", _ltx_call,
               _ltx_geometry, ("transformer_blocks",), sequence_split="ltx"),
        Family("hunyuan_video", "HunyuanVideoTransformer3DModel", "HunyuanVideoPipeline",
               "sample", _hunyuan_call, _hunyuan_geometry,
               ("transformer_blocks", "single_transformer_blocks"),
               lora_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                             "proj_mlp"), text_encoder="hunyuan_video",
               sequence_split="hunyuan", ring=False),
        Family("cogvideox", "CogVideoXTransformer3DModel", "CogVideoXPipeline", "sample",
               _cogvideox_call, _cogvideox_geometry, ("transformer_blocks",), prediction="v",
               sequence_split="cogvideox", ring=False),
    )
}  # fmt: skip


def family_of(cfg: PretrainedConfig) -> Family:
    if cfg.family not in FAMILIES:
        raise ValueError(
            f"model.pretrained.family={cfg.family!r} is not one of {', '.join(FAMILIES)}"
        )
    return FAMILIES[cfg.family]


def _diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(
            "pretrained models need diffusers: pip install 'diffusers>=0.35'"
        ) from error
    return diffusers


class PretrainedVideoModel(nn.Module):
    """A family's diffusers transformer(s) behind the trainer's velocity-model call. Each expert
    is an attribute named as in the family's pipeline (`transformer`, `transformer_2`), so the
    state dict and the LoRA names are diffusers' own under that prefix."""

    def __init__(
        self,
        family: Family,
        experts: list[nn.Module],
        geometry,
        cfg: PretrainedConfig,
        alphas_cumprod: Tensor | None = None,
    ):
        super().__init__()
        if (family.prediction == "v") != (alphas_cumprod is not None):
            raise ValueError(f"{family.name}: a v-prediction family needs its schedule, no other")
        if len(experts) != len(family.experts):
            raise ValueError(f"{family.name} has {len(family.experts)} experts, got {len(experts)}")
        if family.time == "token" and geometry.patch_size[0] != 1:
            raise ValueError(
                f"model.pretrained.family={family.name} takes one time per token of a frame and "
                "needs a temporal patch size of 1"
            )
        for name, expert in zip(family.experts, experts, strict=True):
            self.add_module(name, expert)
        self.family = family
        self.cfg = geometry  # patch_size and the sizes, as Tessera's DiT has them
        self.pretrained = cfg
        # What it reads, as the preset has it (a folder's config.json must match: check_folder).
        self.in_channels: int = cfg.in_channels
        self.text_dim: int = cfg.text_dim
        # Not persistent: the schedule is the scheduler folder's, not a trained weight.
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    @property
    def experts(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.family.experts]

    @property
    def blocks(self) -> list[nn.Module]:
        """Every expert's blocks, in order: the units FSDP2, checkpointing and compile wrap."""
        return [
            block
            for expert in self.experts
            for blocks in self.family.blocks
            for block in getattr(expert, blocks)
        ]

    def timesteps(self, t: Tensor, grid: tuple[int, int, int], given: Tensor | None) -> Tensor:
        """(B,) for a family with one time per sample; (B, tokens), each token its frame's time,
        for one with a time per token."""
        if self.family.time == "sample":
            if given is not None and bool(given.any()):
                raise ValueError(
                    f"model.pretrained.family={self.family.name} has one time per sample and "
                    "cannot keep given frames clean: train it with conditioning=t2v"
                )
            if t.ndim == 2:  # per-frame times of a sample without given frames are all equal
                t = t[:, 0]
            return t * TIME_SCALE
        frames, height, width = grid
        per_frame = t[:, None].expand(-1, frames) if t.ndim == 1 else t
        return (per_frame[:, :, None] * TIME_SCALE).expand(-1, -1, height * width).flatten(1)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        given: Tensor | None = None,
        fps: Tensor | None = None,
        native_size: Tensor | None = None,
        condition: Tensor | None = None,
    ) -> Tensor:
        """Velocity (B, C, T, H, W), the call of model/dit.py's DiT (native_size unused);
        `condition`: a family that takes given frames as channels needs its channel_condition."""
        if (condition is None) == (self.family.given == "channels"):
            raise ValueError(
                f"model.pretrained.family={self.family.name} "
                + ("needs" if condition is None else "takes no")
                + " given frames as input channels (channel_condition)"
            )
        grid = token_grid(x.shape[2:], self.cfg.patch_size)
        timestep = self.timesteps(t, grid, given)
        patch = tuple(self.cfg.patch_size)
        call = Call(
            x, timestep, text, text_mask, fps, patch, self.pretrained, self.alphas_cumprod,
            condition,
        )  # fmt: skip
        if len(self.family.experts) == 1:
            return self.family.call(self.experts[0], call)
        return self._by_expert(call, t if t.ndim == 1 else t[:, 0])

    def _by_expert(self, call: Call, t: Tensor) -> Tensor:
        """Each sample through the expert of its noise level. Every expert runs on every call,
        on its samples or, when it has none, on the first sample with its output times zero:
        sharded experts then gather and reduce on every rank alike. (Choosing costs one host
        sync a call, for the experts' batch sizes.)"""
        high = t * TIME_SCALE >= self.pretrained.boundary * TIME_SCALE
        velocity = torch.zeros_like(call.x)
        for expert, chosen in zip(self.experts, (high, ~high), strict=True):
            index = chosen.nonzero().flatten()
            if index.numel() == 0:
                idle = self.family.call(expert, _subset(call, slice(0, 1)))
                velocity = velocity + 0.0 * idle.sum()
                continue
            velocity = velocity.index_copy(0, index, self.family.call(expert, _subset(call, index)))
        return velocity


def _subset(call: Call, index) -> Call:
    fps = None if call.fps is None else call.fps[index]
    condition = None if call.condition is None else call.condition[index]
    return Call(
        call.x[index], call.timestep[index], call.text[index], call.text_mask[index], fps,
        call.patch_size, call.cfg, call.alphas_cumprod, condition,
    )  # fmt: skip


def given_pixel_frames(given: Tensor, temporal_compression: int) -> Tensor:
    """(B, F) bool, F = 1 + c (T - 1): the pixel frames a family that takes given frames as
    channels is shown for given latent frames (B, T), as Wan's I2V pipeline shows them: the first
    pixel frame when the first latent frame is given (its image), the last when the last is (its
    last image, first-and-last-frame)."""
    batch, frames = given.shape
    pixels = torch.zeros(batch, 1 + temporal_compression * (frames - 1), dtype=torch.bool)
    pixels = pixels.to(given.device)
    pixels[:, 0] = given[:, 0]
    if frames > 1:
        pixels[:, -1] = given[:, -1]
    return pixels


def channel_condition(latents: Tensor, given_pixels: Tensor, temporal_compression: int) -> Tensor:
    """Wan 2.2 I2V's input channels beside the noisy latents, as its pipeline makes them:
    `latents` (B, C, T, H, W) are the autoencoder's of the clip with every pixel frame not in
    `given_pixels` (B, F) zero; before them, c mask channels, one per pixel frame of each latent
    frame (the first pixel frame counted c times, as the first latent frame stands for it alone)."""
    batch, _, frames, height, width = latents.shape
    c = temporal_compression
    if given_pixels.shape != (batch, 1 + c * (frames - 1)):
        raise ValueError(
            f"given pixel frames {tuple(given_pixels.shape)} do not match latents "
            f"{tuple(latents.shape)} at a temporal compression of {c}"
        )
    mask = torch.cat([given_pixels[:, :1].expand(-1, c), given_pixels[:, 1:]], dim=1)
    mask = mask.view(batch, frames, c).transpose(1, 2).to(latents.dtype)
    mask = mask[:, :, :, None, None].expand(-1, -1, -1, height, width)
    return torch.cat([mask, latents], dim=1)


# ------------------------------------------------------------------------------------------------
# Folders
# ------------------------------------------------------------------------------------------------


def expert_folder(path: str | os.PathLike, name: str) -> Path:
    """The folder of expert `name`'s config.json: `path/name` in a pipeline folder, or `path`
    itself for a lone transformer (one expert only)."""
    root = Path(path)
    if not root.is_dir():
        raise PretrainedFolderError(f"model folder not found: {root} (model.pretrained.path)")
    candidates = (root / name,) if name != "transformer" else (root, root / name)
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise PretrainedFolderError(
        f"no {name} in {root}: none of {', '.join(str(c / 'config.json') for c in candidates)} exists"
    )


def expected_config(geometry, cfg: PretrainedConfig) -> dict:
    """The diffusers config values a folder must hold for this preset."""
    return family_of(cfg).geometry(geometry, cfg) | dict(cfg.config)


def check_folder(folder: Path, family: Family, expected: dict) -> dict:
    """Read folder/config.json, check it against the family and `expected` and that every weight
    file it needs is there; returns the config."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise PretrainedFolderError(f"cannot read {config_file}: {error}") from error
    if config.get("_class_name") != family.transformer:
        raise PretrainedFolderError(
            f"{config_file} is the config of a {config.get('_class_name')!r}, not of the "
            f"{family.transformer} of model.pretrained.family={family.name}"
        )
    wrong = {
        key: (config.get(key), value)
        for key, value in expected.items()
        if (list(config[key]) if isinstance(config.get(key), list) else config.get(key)) != value
    }
    if wrong:
        details = ", ".join(
            f"{k}={got} (the preset has {want})" for k, (got, want) in wrong.items()
        )
        raise PretrainedFolderError(f"{config_file} is another model than the preset: {details}")
    for shard in _weight_files(folder):
        if not shard.is_file():
            raise PretrainedFolderError(f"weight file {shard} is missing")
    return config


def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise PretrainedFolderError(f"cannot read the shard index {index}: {error}") from error
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / WEIGHTS_NAME]


def load_pretrained(geometry, cfg: PretrainedConfig) -> PretrainedVideoModel:
    """The family's transformer(s) in `cfg.path`, checked against the preset, in fp32."""
    family = family_of(cfg)
    if not cfg.path:
        raise PretrainedFolderError(
            "model.pretrained.path is not set: point it at a local diffusers folder"
        )
    model_class = getattr(_diffusers(), family.transformer)
    experts = []
    for name in family.experts:
        folder = expert_folder(cfg.path, name)
        check_folder(folder, family, expected_config(geometry, cfg))
        try:
            expert = model_class.from_pretrained(
                folder, local_files_only=True, torch_dtype=torch.float32
            )
        except (OSError, ValueError, RuntimeError) as error:
            raise PretrainedFolderError(
                f"cannot load the transformer in {folder}: {error}"
            ) from error
        experts.append(expert)
    schedule = _alphas_cumprod(cfg.path) if family.prediction == "v" else None
    return PretrainedVideoModel(family, experts, geometry, cfg, schedule)


def _alphas_cumprod(path: str) -> Tensor:
    """The DDPM schedule of the pipeline folder's scheduler/ (a v-prediction family)."""
    folder = Path(path) / "scheduler"
    config_file = folder / "scheduler_config.json"
    try:
        class_name = json.loads(config_file.read_text())["_class_name"]
        scheduler = getattr(_diffusers(), class_name).from_pretrained(folder)
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise PretrainedFolderError(
            f"cannot read the noise schedule in {config_file}: {error} (a v-prediction model "
            "needs its pipeline folder, scheduler/ included)"
        ) from error
    if scheduler.config.get("prediction_type") != "v_prediction":
        raise PretrainedFolderError(
            f"{config_file} has prediction_type={scheduler.config.get('prediction_type')!r}, "
            "not the v_prediction this family makes"
        )
    return scheduler.alphas_cumprod.to(torch.float32)


def save_pretrained(
    model: PretrainedVideoModel, folder: str | os.PathLike, max_shard_size: str = "5GB"
) -> list[Path]:
    """Each expert in diffusers' layout (config.json + safetensors shards) in `folder/<name>`,
    as the family's pipeline folder holds it."""
    written = []
    for name, expert in zip(model.family.experts, model.experts, strict=True):
        expert.save_pretrained(
            Path(folder) / name, safe_serialization=True, max_shard_size=max_shard_size
        )
        written.append(Path(folder) / name)
    return written


# ------------------------------------------------------------------------------------------------
# LoRA (peft, through diffusers' adapter methods)
# ------------------------------------------------------------------------------------------------


def add_lora(
    model: PretrainedVideoModel, rank: int, alpha: float, target_modules: list[str] | None = None
) -> None:
    """A LoRA adapter on the `target_modules` (None: the family's `lora_targets`) of every expert
    that trains (model.pretrained.train_experts), everything else frozen. peft starts lora_B at
    zero, so the output is unchanged until the adapter trains."""
    from peft import LoraConfig

    target_modules = model.family.lora_targets if target_modules is None else target_modules
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True
    )
    model.requires_grad_(False)
    for name in trained_experts(model):
        try:
            getattr(model, name).add_adapter(config)
        except ValueError as error:
            raise ValueError(f"lora.target_modules={list(target_modules)}: {error}") from error
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)


def trained_experts(model: PretrainedVideoModel) -> list[str]:
    """The experts that train: all of a one-expert family, else model.pretrained.train_experts."""
    if len(model.family.experts) == 1:
        return list(model.family.experts)
    return [name for name in model.family.experts if name in model.pretrained.train_experts]


def freeze_untrained_experts(model: PretrainedVideoModel) -> None:
    """Full fine-tuning of some experts only: the others keep their pretrained weights."""
    for name in model.family.experts:
        if name not in trained_experts(model):
            getattr(model, name).requires_grad_(False)


def lora_config(expert: nn.Module) -> dict:
    """An expert's adapter config, as diffusers stores it beside LoRA weights."""
    values = expert.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in values.items()}


def adapter_weights(expert: nn.Module) -> dict[str, Tensor]:
    """An expert's adapter tensors under diffusers' LoRA names (blocks.0.attn1.to_q.lora_A.weight)."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.contiguous()
        for k, v in get_peft_model_state_dict(expert, adapter_name="default").items()
    }


def save_lora(model: PretrainedVideoModel, folder: str | os.PathLike) -> Path:
    """The adapters in the family pipeline's LoRA format: `pytorch_lora_weights.safetensors` with
    `transformer.`-prefixed keys and the adapter's config, which the pipeline's `load_lora_weights`
    reads. A second expert's adapter goes to `folder/transformer_2/` in the same format (Wan 2.2's
    pipeline loads it with `load_into_transformer_2=True`)."""
    pipeline_class = getattr(_diffusers(), model.family.pipeline)
    for name in trained_experts(model):
        expert = getattr(model, name)
        target = Path(folder) if name == "transformer" else Path(folder) / name
        pipeline_class.save_lora_weights(
            target,
            transformer_lora_layers=adapter_weights(expert),
            transformer_lora_adapter_metadata=lora_config(expert),
        )
    return Path(folder)


def merge_lora(model: PretrainedVideoModel) -> None:
    """Fold the adapters into the base weights (W + alpha/r B A) and remove them, in place."""
    for name in trained_experts(model):
        expert = getattr(model, name)
        expert.fuse_lora(lora_scale=1.0)
        expert.unload_lora()

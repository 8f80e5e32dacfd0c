"""The spacetime diffusion transformer (DiT) that predicts flow velocities of video latents.

Latents (B, C, T, H, W) are cut into t×h×w patches, one token each, in frame-major order. Every
block runs self-attention over all spacetime tokens (RMS-normalised queries/keys, 3D rotary
positions), cross-attention to the caption and an MLP. The flow time conditions each block through
adaLN-Zero: shift/scale/gate for self-attention and MLP, produced per sample or per latent frame so
that clean conditioning frames (t = 0) and noisy frames can share one sequence. Two more inputs add
to that condition: a learned vector on the frames that are given (see model/conditioning.py), and
the micro-conditions frame rate and native resolution of the source.

Cross-attention is ungated, as in PixArt-alpha: the caption matters at every noise level, so a
time-dependent gate buys little and would cost width² parameters per block; its zero-initialised
output projection keeps every block the identity at initialisation, like the adaLN-Zero gates.

Sizes follow one rule, set by the width w: ``depth = num_heads = max(1, w / 64)``, so heads are 64
wide, and below w = 64 the single block has one head of width w. Per block this is 22·w² parameters
(self-attn 4, cross-attn 4, MLP 8, adaLN 6), so the width alone sets the size (block parameters;
embeddings add text_dim·width and a little more):

    pico 16 (~6K)      nano 32 (~23K)     micro 64 (~0.09M)  tiny 128 (~0.7M)  mini 192 (~2.4M)
    small 256 (~5.8M)  base 384 (~19M)    medium 768 (~156M) large 1024 (~369M)
    1b 1408 (~0.96B)   3b 2048 (~2.95B)   10b 3072 (~10.0B)

pico to mini are CPU sizes for tests and the scaling-law demo sweep.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn

from model.attention import attention
from model.geometry import token_grid

TIME_FREQUENCY_DIM = 256  # sinusoidal features fed to the timestep MLP, as in DiT


@dataclass
class DiTConfig:
    size: str = "tiny"  # name only, for logs
    depth: int = 2
    width: int = 128
    num_heads: int = 2
    mlp_ratio: float = 4.0
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w) in latent units
    qk_norm: bool = True
    rope_theta: float = 10000.0


def _config_for_width(size: str, width: int) -> DiTConfig:
    depth = max(1, width // 64)
    return DiTConfig(size=size, depth=depth, width=width, num_heads=depth)


DIT_SIZES: dict[str, DiTConfig] = {
    size: _config_for_width(size, width)
    for size, width in [
        ("pico", 16),
        ("nano", 32),
        ("micro", 64),
        ("tiny", 128),
        ("mini", 192),
        ("small", 256),
        ("base", 384),
        ("medium", 768),
        ("large", 1024),
        ("1b", 1408),
        ("3b", 2048),
        ("10b", 3072),
    ]
}


def dit_config(size: str) -> DiTConfig:
    """A fresh copy of the registered config for `size` (e.g. "tiny", "1b")."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; known sizes: {', '.join(DIT_SIZES)}")
    return dataclasses.replace(DIT_SIZES[size], patch_size=list(DIT_SIZES[size].patch_size))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Rotary position embedding over the (t, h, w) token grid
# --------------------------------------------------------------------------------------------------


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """How many of the head_dim/2 rotated pairs encode time, height and width.

    About a third each: height and width get equal shares and time takes what is left.
    """
    pairs = head_dim // 2
    spatial = (pairs - pairs // 3) // 2
    return pairs - 2 * spatial, spatial, spatial


def rope_cos_sin(
    grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (T*H*W, head_dim/2), for a frame-major token grid.

    Computed from integer grid positions on the fly, so any duration, resolution or aspect works.
    """
    axis_angles = []
    for length, pairs in zip(grid, rope_axis_pairs(head_dim), strict=True):
        frequencies = theta ** (-torch.arange(pairs, device=device, dtype=torch.float32) / pairs)
        positions = torch.arange(length, device=device, dtype=torch.float32)
        axis_angles.append(torch.outer(positions, frequencies))
    t_angles, h_angles, w_angles = axis_angles
    frames, height, width = grid
    angles = torch.cat(
        [
            t_angles[:, None, None, :].expand(frames, height, width, -1),
            h_angles[None, :, None, :].expand(frames, height, width, -1),
            w_angles[None, None, :, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    ).flatten(0, 2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, N, H, D) queries or keys; dim i pairs with dim i + D/2 ("rotate half" layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN on tokens x (B, N, W) with shift/scale (B, G, W): row g applies to the g-th of G equal
    runs of consecutive tokens, i.e. G = 1 (one per sample) or G = frames (frame-major tokens)."""
    x = x.unflatten(1, (shift.shape[1], -1))
    return (x * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def gate(x: Tensor, gate_values: Tensor) -> Tensor:
    """Scale tokens x (B, N, W) by gate_values (B, G, W), grouped like `modulate`."""
    return (x.unflatten(1, (gate_values.shape[1], -1)) * gate_values[:, :, None]).flatten(1, 2)


def sinusoidal_features(values: Tensor, scale: float) -> Tensor:
    """(...,) scalars -> (..., TIME_FREQUENCY_DIM) cos/sin features of values * scale."""
    half = TIME_FREQUENCY_DIM // 2
    frequencies = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=values.device, dtype=torch.float32) / half
    )
    angles = (values.float() * scale)[..., None] * frequencies
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """Flow time in [0, 1] -> sinusoidal features -> MLP -> width."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width)
        )

    def forward(self, t: Tensor) -> Tensor:
        # t * 1000 puts flow time on DiT's 0..1000 step scale, which these frequencies resolve.
        features = sinusoidal_features(t, 1000.0)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class MicroConditionEmbedder(nn.Module):
    """Micro-conditions, as in SDXL: the frame rate and the source's native (height, width) before
    resizing, each as sinusoidal features (raw units resolve well: fps ~1-60, sizes ~10^2-10^4),
    through one MLP. Its output layer starts at zero, so a fresh model ignores them; a trained one
    lets a user ask for a frame rate, and for the look of a high-resolution source."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(3 * TIME_FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width)
        )

    def forward(self, fps: Tensor, native_size: Tensor) -> Tensor:
        values = torch.cat([fps[:, None], native_size], dim=1)  # (B, 3)
        features = sinusoidal_features(values, 1.0).flatten(1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)
        self.attend = attention  # sequence parallelism swaps in a distributed attention

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(dim=2)
        # Autocast may run the norms in fp32; attention kernels need one dtype.
        q = apply_rope(self.q_norm(q), *rope).type_as(v)
        k = apply_rope(self.k_norm(k), *rope).type_as(v)
        return self.proj(self.attend(q, k, v).flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = width // num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        q = self.q(x).unflatten(-1, (self.num_heads, -1))
        k, v = self.kv(context).unflatten(-1, (2, self.num_heads, -1)).unbind(dim=2)
        q, k = self.q_norm(q).type_as(v), self.k_norm(k).type_as(v)
        out = attention(q, k, v, key_mask=context_mask)
        return self.proj(out.flatten(2))


class DiTBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(width, num_heads, qk_norm)
        self.norm_cross = nn.LayerNorm(width, eps=1e-6)
        self.cross_attn = CrossAttention(width, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        context: Tensor,
        context_mask: Tensor,
        rope: tuple[Tensor, Tensor],
    ) -> Tensor:
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond).chunk(
            6, dim=-1
        )
        x = x + gate(self.self_attn(modulate(self.norm1(x), shift_sa, scale_sa), rope), gate_sa)
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), gate_mlp)
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig, in_channels: int, text_dim: int):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.in_channels = in_channels
        self.text_dim = text_dim
        patch_dim = in_channels * math.prod(cfg.patch_size)

        # A Linear on flattened patches: same maths as a strided Conv3d, ~2x faster on CPU.
        self.patch_embed = nn.Linear(patch_dim, cfg.width)
        self.time_embed = TimestepEmbedder(cfg.width)
        self.micro_embed = MicroConditionEmbedder(cfg.width)
        # Given (clean conditioning) frames add a learned vector to their adaLN condition: it
        # reaches every block, as the time does, costs one vector, and starting at zero leaves a
        # text-to-video model unchanged. (An input mask channel would only reach the first layer.)
        self.given_embed = nn.Parameter(torch.zeros(cfg.width))
        self.caption_proj = nn.Sequential(
            nn.Linear(text_dim, cfg.width),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.width, cfg.width),
        )
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(cfg.width, patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # adaLN-Zero: every residual branch starts closed and the output starts at zero.
        zeroed = [
            self.final_layer.modulation[-1],
            self.final_layer.linear,
            self.micro_embed.mlp[-1],
        ]
        for block in self.blocks:
            zeroed += [block.modulation[-1], block.cross_attn.proj]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        given: Tensor | None = None,
        fps: Tensor | None = None,
        native_size: Tensor | None = None,
    ) -> Tensor:
        """Velocity (B, C, T, H, W) for latents x at flow time t.

        t: (B,) for one time per sample, or (B, T) for one per latent frame (frames that share a
        temporal patch are conditioned on their mean). text: (B, L, text_dim) caption states with
        text_mask (B, L) bool, True for real tokens. given: (B, T) bool, the clean conditioning
        frames. fps (B,) and native_size (B, 2) (source height, width in pixels): micro-conditions,
        both or neither.
        """
        self._check_inputs(x, t, text, text_mask, given, fps, native_size)
        pt, ph, pw = self.cfg.patch_size
        grid = token_grid(x.shape[2:], self.cfg.patch_size)

        patches = rearrange(
            x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw
        )
        tokens = self.patch_embed(patches)
        cond = self.time_embed(self._per_token_frame(t, grid[0]))  # (B, 1 or frames, width)
        if given is not None:
            cond = cond + self._per_token_frame(given.to(cond.dtype), grid[0])[..., None] * (
                self.given_embed.to(cond.dtype)
            )
        if fps is not None:
            cond = cond + self.micro_embed(fps, native_size)[:, None]
        context = self.caption_proj(text)
        head_dim = self.cfg.width // self.cfg.num_heads
        rope = rope_cos_sin(grid, head_dim, self.cfg.rope_theta, device=x.device)

        for block in self.blocks:
            tokens = block(tokens, cond, context, text_mask, rope)

        patches = self.final_layer(tokens, cond)
        return rearrange(
            patches,
            "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
            t=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw,
        )  # fmt: skip

    def _per_token_frame(self, values: Tensor, token_frames: int) -> Tensor:
        """(B,) -> (B, 1); (B, T) per latent frame -> (B, token frames), averaged per patch."""
        if values.ndim == 1:
            return values[:, None]
        return values.unflatten(1, (token_frames, self.cfg.patch_size[0])).mean(dim=2)

    def _check_inputs(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        given: Tensor | None,
        fps: Tensor | None,
        native_size: Tensor | None,
    ) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"latents must be (B, C={self.in_channels}, T, H, W), got {tuple(x.shape)}"
            )
        token_grid(x.shape[2:], self.cfg.patch_size)  # raises unless whole patches
        batch, frames = x.shape[0], x.shape[2]
        if t.shape not in ((batch,), (batch, frames)):
            raise ValueError(
                f"t must be (B,) = ({batch},) or (B, T) = ({batch}, {frames}), got {tuple(t.shape)}"
            )
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.text_dim:
            raise ValueError(
                f"text must be (B={batch}, L, text_dim={self.text_dim}), got {tuple(text.shape)}"
            )
        if text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool:
            raise ValueError(
                f"text_mask must be bool of shape {tuple(text.shape[:2])}, "
                f"got {text_mask.dtype} {tuple(text_mask.shape)}"
            )
        if given is not None and (given.shape != (batch, frames) or given.dtype != torch.bool):
            raise ValueError(
                f"given must be bool of shape (B, T) = ({batch}, {frames}), "
                f"got {given.dtype} {tuple(given.shape)}"
            )
        if (fps is None) != (native_size is None):
            raise ValueError("fps and native_size are micro-conditions: pass both or neither")
        if fps is not None and (fps.shape != (batch,) or native_size.shape != (batch, 2)):
            raise ValueError(
                f"fps must be (B,) = ({batch},) and native_size (B, 2) = ({batch}, 2), "
                f"got {tuple(fps.shape)} and {tuple(native_size.shape)}"
            )


def _check_config(cfg: DiTConfig) -> None:
    if cfg.depth < 1:
        raise ValueError(f"DiTConfig.depth must be >= 1, got {cfg.depth}")
    if cfg.width % cfg.num_heads:
        raise ValueError(
            f"DiTConfig.width ({cfg.width}) must be divisible by num_heads ({cfg.num_heads})"
        )
    head_dim = cfg.width // cfg.num_heads
    if head_dim % 2 or head_dim < 6:
        raise ValueError(
            f"head dim width/num_heads = {head_dim} must be even and >= 6 for 3D rotary embedding"
        )
    if len(cfg.patch_size) != 3 or any(p < 1 for p in cfg.patch_size):
        raise ValueError(
            f"DiTConfig.patch_size must be three positive ints (t, h, w), got {cfg.patch_size}"
        )

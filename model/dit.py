"""The spacetime diffusion transformer (DiT) that predicts flow velocities of video latents.

Latents (B, C, T, H, W) are cut into t×h×w patches, one token each, in frame-major order. Every
block runs self-attention over all spacetime tokens (RMS-normalised queries/keys, 3D rotary
positions), cross-attention to the caption and an MLP. The flow time conditions each block through
adaLN-Zero: shift/scale/gate for self-attention and MLP, produced per sample or per latent frame so
that clean conditioning frames (t = 0) and noisy frames can share one sequence. Two more inputs add
to that condition: a learned vector on the frames that are given (see model/conditioning.py), and
the micro-conditions frame rate and native resolution of the source.

Packed sequences, as in NaViT: `forward` also takes samples of different shapes, as a list of
groups of one shape each (B_g, C, T_g, H_g, W_g), every sample with its own caption, time(s), given
frames and micro-conditions, and runs them as one token sequence, their tokens in order and then
padding up to a fixed `sequence_length` (grouped, the work outside the blocks takes one call per
shape, not per sample). Each sample gets exactly what it would alone: self-attention stays within
it (block-diagonal; the padding attends to nothing), it cross-attends to its own caption, its
rotary positions are those of its own grid, and its adaLN rows (one per sample and token frame)
are gathered to its tokens. A `TokenLayout` tells the blocks where each sample lies.

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
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model.attention import Segments, attention, equal_runs, split_runs
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


def token_positions(
    grids: list[tuple[int, int, int]], device: torch.device | None = None
) -> Tensor:
    """(N, 3) float32: the (t, h, w) position of every token of these token grids, each grid
    frame-major, one after the other. Computed on the fly, so any duration, resolution or aspect
    works; on the host (a pack's grids are a handful of small integers), then copied once."""
    sizes = np.array(grids, dtype=np.int64).reshape(-1, 3)
    tokens = sizes.prod(axis=1)
    offset = np.arange(tokens.sum()) - np.repeat(np.cumsum(tokens) - tokens, tokens)
    height, width = np.repeat(sizes[:, 1], tokens), np.repeat(sizes[:, 2], tokens)
    positions = [offset // (height * width), offset // width % height, offset % width]
    return torch.from_numpy(np.stack(positions, axis=1).astype(np.float32)).to(device)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (N, head_dim/2), of tokens at (N, 3) positions
    (`token_positions`): time, height and width each rotate their share of the pairs."""
    angles = []
    for axis, pairs in enumerate(rope_axis_pairs(head_dim)):
        exponents = torch.arange(pairs, device=positions.device, dtype=torch.float32) / pairs
        angles.append(positions[:, axis, None] * theta**-exponents)
    angles = torch.cat(angles, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, N, H, D) queries or keys; dim i pairs with dim i + D/2 ("rotate half" layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


@dataclass(frozen=True)
class TokenLayout:
    """What the blocks and the final layer know about a token sequence besides its tokens.

    A dense batch (B, N) has only the rotary table its samples share; its adaLN rows, one per
    sample or per token frame, reach their tokens through `modulate`'s runs. A packed sequence
    (1, N) also has each token's adaLN row, the self-attention segments (one per sample; the
    padding after them attends to nothing) and each sample's token count, for cross-attention to
    its own caption.
    """

    rope: tuple[Tensor, Tensor]  # cos, sin: (N, head_dim/2) each
    rows: Tensor | None = None  # (N,) int64: the adaLN row of each token
    segments: Segments | None = None
    sample_tokens: tuple[int, ...] | None = None  # the padding follows them

    @classmethod
    def packed(
        cls,
        grids: list[tuple[int, int, int]],
        head_dim: int,
        theta: float,
        sequence_length: int | None,
        device: torch.device,
    ) -> TokenLayout:
        """Samples with these token grids, in order, then padding up to sequence_length tokens
        (None: none). adaLN rows: one per (sample, token frame), then one for the padding."""
        sample_tokens = [math.prod(grid) for grid in grids]
        padding = 0 if sequence_length is None else sequence_length - sum(sample_tokens)
        if padding < 0:
            raise ValueError(
                f"sequence_length={sequence_length} is less than the {sum(sample_tokens)} tokens "
                "of the packed samples"
            )
        frame_tokens = [height * width for frames, height, width in grids for _ in range(frames)]
        rows = np.repeat(np.arange(len(frame_tokens) + 1), [*frame_tokens, padding])
        rows = torch.from_numpy(rows).to(device)
        # The padding takes the positions of a (padding, 1, 1) grid: any do, it attends to nothing.
        positions = token_positions([*grids, (padding, 1, 1)], device)
        segments = Segments.from_lengths(sample_tokens, device, padding)
        return cls(rope_cos_sin(positions, head_dim, theta), rows, segments, tuple(sample_tokens))

    def per_token(self, rows: Tensor) -> Tensor:
        """adaLN rows as `modulate` and `gate` take them: a packed sequence's (1, R, W) gathered
        to one per token (1, N, W); a dense batch's (B, G, W) as they are."""
        # An embedding lookup: on the CPU its backward is several times faster than
        # index_select's (index_add_ along dim 1).
        return rows if self.rows is None else F.embedding(self.rows, rows[0])[None]

    def tokens(self, start: int, stop: int) -> TokenLayout:
        """The layout of tokens start:stop, as one rank of a sequence-parallel group holds them.
        Self-attention keeps the whole sequence's segments: it sees all tokens again after the
        all-to-all."""
        rope = (self.rope[0][start:stop], self.rope[1][start:stop])
        if self.rows is None:
            return TokenLayout(rope)
        bounds = itertools.pairwise([0, *itertools.accumulate(self.sample_tokens)])
        local = tuple(max(0, min(end, stop) - max(begin, start)) for begin, end in bounds)
        return TokenLayout(rope, self.rows[start:stop], self.segments, local)


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

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], segments: Segments | None = None
    ) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(dim=2)
        # Autocast may run the norms in fp32; attention kernels need one dtype.
        q = apply_rope(self.q_norm(q), *rope).type_as(v)
        k = apply_rope(self.k_norm(k), *rope).type_as(v)
        return self.proj(self.attend(q, k, v, segments=segments).flatten(2))


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

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        context_mask: Tensor,
        sample_tokens: tuple[int, ...] | None = None,
    ) -> Tensor:
        """sample_tokens: for a packed sequence, each sample's token count (row i of context is
        sample i's caption)."""
        q = self.q(x).unflatten(-1, (self.num_heads, -1))
        k, v = self.kv(context).unflatten(-1, (2, self.num_heads, -1)).unbind(dim=2)
        q, k = self.q_norm(q).type_as(v), self.k_norm(k).type_as(v)
        if sample_tokens is None:
            out = attention(q, k, v, key_mask=context_mask)
        else:
            out = _attend_own_captions(q, k, v, context_mask, sample_tokens)
        return self.proj(out.flatten(2))


def _attend_own_captions(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, sample_tokens: tuple[int, ...]
) -> Tensor:
    """Packed queries (1, N, H, D): sample i's tokens attend to caption i (k[i], v[i] with
    key_mask[i]), consecutive samples of one size in one call; the padding after the samples
    gets zero."""
    runs = equal_runs(sample_tokens)
    padding = q.shape[1] - sum(sample_tokens)
    (queries,) = split_runs([*runs, (padding, 1)], q)
    outs, sample = [], 0
    for (length, count), run in zip(runs, queries[:-1], strict=True):
        captions = slice(sample, sample + count)
        out = attention(
            run.unflatten(0, (count, length)), k[captions], v[captions], key_mask[captions]
        )
        outs.append(out.flatten(0, 1))
        sample += count
    return torch.cat([*outs, q.new_zeros(padding, *q.shape[2:])])[None]


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
        layout: TokenLayout,
    ) -> Tensor:
        modulation = layout.per_token(self.modulation(cond))
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        normed = modulate(self.norm1(x), shift_sa, scale_sa)
        x = x + gate(self.self_attn(normed, layout.rope, layout.segments), gate_sa)
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask, layout.sample_tokens)
        x = x + gate(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), gate_mlp)
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_dim)

    def forward(self, x: Tensor, cond: Tensor, layout: TokenLayout) -> Tensor:
        shift, scale = layout.per_token(self.modulation(cond)).chunk(2, dim=-1)
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
        self.head_dim = cfg.width // cfg.num_heads
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
        x: Tensor | list[Tensor],
        t: Tensor | list[Tensor],
        text: Tensor,
        text_mask: Tensor,
        given: Tensor | list[Tensor] | None = None,
        fps: Tensor | None = None,
        native_size: Tensor | None = None,
        *,
        sequence_length: int | None = None,
    ) -> Tensor | list[Tensor]:
        """Velocity (B, C, T, H, W) for latents x at flow time t.

        t: (B,) for one time per sample, or (B, T) for one per latent frame (frames that share a
        temporal patch are conditioned on their mean). text: (B, L, text_dim) caption states with
        text_mask (B, L) bool, True for real tokens. given: (B, T) bool, the clean conditioning
        frames. fps (B,) and native_size (B, 2) (source height, width in pixels): micro-conditions,
        both or neither.

        Packed: x a list of groups of samples, group g a batch of B_g latents of one shape
        (B_g, C, T_g, H_g, W_g), t and given lists of their times and given frames as above; text,
        text_mask, fps and native_size as above with one row per sample, group after group. All
        the samples run as one sequence, padded to sequence_length tokens (None: no padding), and
        the list of the groups' velocities is what each sample would get alone.
        """
        if isinstance(x, list):
            return self._forward_packed(
                x, t, text, text_mask, given, fps, native_size, sequence_length
            )
        if sequence_length is not None:
            raise ValueError("sequence_length pads a packed batch: pass x as a list of latents")
        self._check_inputs(x, t, text, text_mask, given, fps, native_size)
        grid = token_grid(x.shape[2:], self.cfg.patch_size)
        cond = self._condition(  # (B, 1 or frames, width)
            self._per_token_frame(t, grid[0]),
            None if given is None else self._per_token_frame(given.float(), grid[0]),
            None if fps is None else self.micro_embed(fps, native_size)[:, None],
        )
        rope = rope_cos_sin(token_positions([grid], x.device), self.head_dim, self.cfg.rope_theta)
        layout = TokenLayout(rope)
        patches = self._transform(self._patchify(x), cond, text, text_mask, layout)
        return self._unpatchify(patches, grid)

    def _forward_packed(
        self,
        x: list[Tensor],
        t: list[Tensor],
        text: Tensor,
        text_mask: Tensor,
        given: list[Tensor] | None,
        fps: Tensor | None,
        native_size: Tensor | None,
        sequence_length: int | None,
    ) -> list[Tensor]:
        self._check_packed_inputs(x, t, text, text_mask, given, fps, native_size)
        grids = [token_grid(group.shape[2:], self.cfg.patch_size) for group in x]
        sample_grids = [grid for group, grid in zip(x, grids, strict=True) for _ in group]
        layout = TokenLayout.packed(
            sample_grids, self.head_dim, self.cfg.rope_theta, sequence_length, x[0].device
        )
        patches = torch.cat([self._patchify(group).flatten(0, 1) for group in x])[None]
        padding = len(layout.rows) - patches.shape[1]
        cond = self._packed_condition(x, t, given, fps, native_size)
        patches = self._transform(F.pad(patches, (0, 0, 0, padding)), cond, text, text_mask, layout)
        group_tokens = [len(group) * math.prod(grid) for group, grid in zip(x, grids, strict=True)]
        per_group = patches[0, : sum(group_tokens)].split(group_tokens)
        return [
            self._unpatchify(p.unflatten(0, (len(group), -1)), grid)
            for p, group, grid in zip(per_group, x, grids, strict=True)
        ]

    def _transform(
        self, patches: Tensor, cond: Tensor, text: Tensor, text_mask: Tensor, layout: TokenLayout
    ) -> Tensor:
        """Patches (B, N, patch_dim) through the embedding, every block and the final layer."""
        tokens = self.patch_embed(patches)
        context = self.caption_proj(text)
        for block in self.blocks:
            tokens = block(tokens, cond, context, text_mask, layout)
        return self.final_layer(tokens, cond, layout)

    def _condition(self, times: Tensor, given_share: Tensor | None, micro: Tensor | None) -> Tensor:
        """adaLN condition rows (..., width) from their times, their shares of given frames and
        their micro-condition embeddings."""
        cond = self.time_embed(times)
        if given_share is not None:
            cond = cond + given_share.to(cond.dtype)[..., None] * self.given_embed.to(cond.dtype)
        if micro is not None:
            cond = cond + micro
        return cond

    def _packed_condition(
        self,
        x: list[Tensor],
        t: list[Tensor],
        given: list[Tensor] | None,
        fps: Tensor | None,
        native_size: Tensor | None,
    ) -> Tensor:
        """adaLN condition rows (1, R + 1, width) of a pack: one per (sample, token frame), in
        token order, then a zero row for the padding."""
        micro = None
        if fps is not None:
            token_frames = [g.shape[2] // self.cfg.patch_size[0] for g in x for _ in range(len(g))]
            micro = self.micro_embed(fps, native_size).repeat_interleave(
                torch.tensor(token_frames, device=fps.device), dim=0, output_size=sum(token_frames)
            )
        cond = self._condition(
            self._token_frame_rows(t, x),
            None if given is None else self._token_frame_rows([g.float() for g in given], x),
            micro,
        )
        return F.pad(cond, (0, 0, 0, 1))[None]

    def _token_frame_rows(self, values: list[Tensor], x: list[Tensor]) -> Tensor:
        """Each group's values, (B_g,) or one per latent frame (B_g, T_g), as one per token frame
        of every sample, concatenated."""
        rows = []
        for value, group in zip(values, x, strict=True):
            token_frames = group.shape[2] // self.cfg.patch_size[0]
            per_frame = self._per_token_frame(value, token_frames)
            rows.append(per_frame.expand(len(group), token_frames).flatten())
        return torch.cat(rows)

    def _patchify(self, x: Tensor) -> Tensor:
        """Latents (B, C, T, H, W) -> patches (B, tokens, patch_dim), frame-major."""
        pt, ph, pw = self.cfg.patch_size
        return rearrange(
            x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw
        )

    def _unpatchify(self, patches: Tensor, grid: tuple[int, int, int]) -> Tensor:
        pt, ph, pw = self.cfg.patch_size
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
        if given is not None and (given.shape != (batch, frames) or given.dtype != torch.bool):
            raise ValueError(
                f"given must be bool of shape (B, T) = ({batch}, {frames}), "
                f"got {given.dtype} {tuple(given.shape)}"
            )
        self._check_sample_conditions(batch, text, text_mask, fps, native_size)

    def _check_packed_inputs(
        self,
        x: list[Tensor],
        t: list[Tensor],
        text: Tensor,
        text_mask: Tensor,
        given: list[Tensor] | None,
        fps: Tensor | None,
        native_size: Tensor | None,
    ) -> None:
        count = len(x)
        if not count or len(t) != count or (given is not None and len(given) != count):
            raise ValueError(
                f"a packed batch needs groups of latents x and one t (and given, if any) per "
                f"group, got {count} x, {len(t)} t and {'no' if given is None else len(given)} "
                "given"
            )
        for i, group in enumerate(x):
            if group.ndim != 5 or group.shape[1] != self.in_channels:
                raise ValueError(
                    f"x[{i}] must be a group of latents (B, C={self.in_channels}, T, H, W), "
                    f"got {tuple(group.shape)}"
                )
            if group.dtype != x[0].dtype:
                raise ValueError(f"x[{i}] is {group.dtype}, x[0] {x[0].dtype}: one dtype for all")
            token_grid(group.shape[2:], self.cfg.patch_size)  # raises unless whole patches
            size, frames = group.shape[0], group.shape[2]
            if t[i].shape not in ((size,), (size, frames)):
                raise ValueError(
                    f"t[{i}] must be (B,) = ({size},) or (B, T) = ({size}, {frames}), "
                    f"got {tuple(t[i].shape)}"
                )
            if given is not None and (
                given[i].shape != (size, frames) or given[i].dtype != torch.bool
            ):
                raise ValueError(
                    f"given[{i}] must be bool of shape (B, T) = ({size}, {frames}), "
                    f"got {given[i].dtype} {tuple(given[i].shape)}"
                )
        self._check_sample_conditions(sum(map(len, x)), text, text_mask, fps, native_size)

    def _check_sample_conditions(
        self,
        batch: int,
        text: Tensor,
        text_mask: Tensor,
        fps: Tensor | None,
        native_size: Tensor | None,
    ) -> None:
        """The caption and micro-conditions: one row per sample of a dense or packed batch."""
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.text_dim:
            raise ValueError(
                f"text must be (B={batch}, L, text_dim={self.text_dim}), got {tuple(text.shape)}"
            )
        if text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool:
            raise ValueError(
                f"text_mask must be bool of shape {tuple(text.shape[:2])}, "
                f"got {text_mask.dtype} {tuple(text_mask.shape)}"
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

"""Multi-head attention on (batch, length, heads, head_dim) tensors, the layout flash-attn uses.

`attention` is a pure function so that sequence parallelism can wrap it from outside. It picks
flash-attn when it can (CUDA, fp16/bf16, no mask) and PyTorch's scaled_dot_product_attention,
which has its own fused kernels, everywhere else.

Packed sequences (several samples in one token sequence, B = 1) attend block-diagonally: each
token only within its own `Segments` entry, and the padding after the segments to nothing.
flash-attn's varlen kernel does that directly; the PyTorch path runs one SDPA per run of
equal-length segments (a batch of them), so a pack costs the sum of its segments' squares, as
the samples would alone, never the square of the whole sequence that an N×N mask would (slower
on CPU even at a few hundred tokens).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # CPU machines and GPUs without the optional flash-attn wheel
    flash_attn_func = flash_attn_varlen_func = None


@dataclass(frozen=True)
class Segments:
    """Contiguous segments along dim 1 of a packed sequence, in the form flash-attn's varlen
    kernels take, then `padding` tokens that attend to nothing (their output is zero); `lengths`
    keeps the segments on the host, so the PyTorch path never syncs a GPU."""

    lengths: tuple[int, ...]
    cu_seqlens: Tensor  # (S + 1,) int32: segment i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    max_seqlen: int
    padding: int = 0

    @classmethod
    def from_lengths(
        cls, lengths: Sequence[int], device: torch.device | None = None, padding: int = 0
    ) -> Segments:
        bounds = [0, *itertools.accumulate(lengths)]
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        return cls(tuple(lengths), cu_seqlens, max(lengths), padding)

    @property
    def tokens(self) -> int:
        return sum(self.lengths) + self.padding


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    segments: Segments | None = None,
) -> Tensor:
    """Softmax attention of q over k/v, all shaped (B, L, H, D); returns (B, Lq, H, D).

    key_mask: optional (B, Lk) bool, True where a key may be attended to. A sample with no valid
    key gets a zero output instead of the NaN a fully masked softmax would give.
    segments: for a packed self-attention sequence (B = 1, Lq = Lk), the segments its tokens are
    cut into; each token attends only to the keys of its own segment. Takes no key_mask.
    """
    if segments is not None:
        return _segment_attention(q, k, v, key_mask, segments)
    if key_mask is None and _flash_attn_applies(q):
        return flash_attn_func(q, k, v)

    attn_mask = None
    has_key = None
    if key_mask is not None:
        if key_mask.shape != (k.shape[0], k.shape[1]) or key_mask.dtype != torch.bool:
            raise ValueError(
                f"key_mask must be a bool tensor of shape (batch, keys) = {tuple(k.shape[:2])}, "
                f"got {key_mask.dtype} {tuple(key_mask.shape)}"
            )
        # Rows without any valid key attend to all keys (no NaN) and are zeroed afterwards.
        has_key = key_mask.any(dim=1)
        attn_mask = (key_mask | ~has_key[:, None])[:, None, None, :]

    out = _sdpa(q, k, v, attn_mask)
    if has_key is not None:
        out = out * has_key[:, None, None, None].to(out.dtype)
    return out


def _segment_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, segments: Segments
) -> Tensor:
    if key_mask is not None:
        raise ValueError("segments take no key_mask: tokens attend to their whole segment")
    if not q.shape[:2] == k.shape[:2] == v.shape[:2] == (1, segments.tokens):
        raise ValueError(
            f"segments of {segments.tokens} tokens need one packed sequence "
            f"(1, {segments.tokens}, H, D) of queries, keys and values, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if _flash_attn_applies(q):
        q, k, v = (x[0, : sum(segments.lengths)] for x in (q, k, v))
        cu_seqlens, longest = segments.cu_seqlens, segments.max_seqlen
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest)
        return F.pad(out, (0, 0, 0, 0, 0, segments.padding))[None]
    runs = equal_runs(segments.lengths)
    q, k, v = split_runs([*runs, (segments.padding, 1)], q, k, v)
    outs = [
        _sdpa(*(x.unflatten(0, (count, length)) for x in run)).flatten(0, 1)
        for (length, count), *run in zip(runs, q[:-1], k[:-1], v[:-1], strict=True)
    ]
    return torch.cat([*outs, torch.zeros_like(q[-1])])[None]


def equal_runs(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(length, count) of each run of consecutive segments of one length: a run is one batched
    kernel call (samples of one shape sit side by side in a pack)."""
    return [(length, len(list(group))) for length, group in itertools.groupby(lengths)]


def split_runs(runs: list[tuple[int, int]], *packed: Tensor) -> list[tuple[Tensor, ...]]:
    """Each packed (1, N, ...) tensor cut into its runs' tokens (length * count, ...), by one
    split: a single autograd node, where a slice per run would each fill a gradient of the
    whole sequence in the backward."""
    sizes = [length * count for length, count in runs]
    return [x[0].split(sizes) for x in packed]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """PyTorch's fused attention, on and back to the (B, L, H, D) layout."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    ).transpose(1, 2)


def _flash_attn_applies(q: Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)

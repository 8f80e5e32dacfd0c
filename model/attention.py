"""Multi-head attention on (batch, length, heads, head_dim) tensors, the layout flash-attn uses.

`attention` is a pure function so that sequence parallelism can wrap it from outside. It picks
flash-attn when it can (CUDA, fp16/bf16, no mask) and PyTorch's scaled_dot_product_attention,
which has its own fused kernels, everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from flash_attn import flash_attn_func
except ImportError:  # CPU machines and GPUs without the optional flash-attn wheel
    flash_attn_func = None


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Softmax attention of q over k/v, all shaped (B, L, H, D); returns (B, Lq, H, D).

    key_mask: optional (B, Lk) bool, True where a key may be attended to. A sample with no valid
    key gets a zero output instead of the NaN a fully masked softmax would give.
    """
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

    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    ).transpose(1, 2)
    if has_key is not None:
        out = out * has_key[:, None, None, None].to(out.dtype)
    return out


def _flash_attn_applies(q: Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)

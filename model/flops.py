"""Analytic parameter and FLOP counts of the DiT, and model FLOPs utilisation (MFU).

Everything is computed from the config, so the numbers for a 10B model cost nothing. FLOPs count
2 per multiply-accumulate of every matmul plus the attention scores and weighted sums; norms,
activations, RoPE and softmax are left out, as is usual for MFU (they are a few percent).
"""

from __future__ import annotations

import math

import torch

from model.dit import TIME_FREQUENCY_DIM, DiTConfig

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched as substrings of
# torch.cuda.get_device_name(); more specific names come first.
_BF16_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # also GH200
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
]


def _linear_params(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def dit_param_count(cfg: DiTConfig, in_channels: int, text_dim: int) -> int:
    """Number of parameters of DiT(cfg, in_channels, text_dim)."""
    width, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    patch_dim = in_channels * math.prod(cfg.patch_size)
    qk_norms = 2 * (width // cfg.num_heads) if cfg.qk_norm else 0

    embeddings = (
        _linear_params(patch_dim, width)
        + _linear_params(TIME_FREQUENCY_DIM, width)
        + _linear_params(width, width)
        + _linear_params(text_dim, width)
        + _linear_params(width, width)
        + _linear_params(3 * TIME_FREQUENCY_DIM, width)  # micro-conditions
        + _linear_params(width, width)
        + width  # the given-frame vector
    )
    self_attention = _linear_params(width, 3 * width) + _linear_params(width, width) + qk_norms
    cross_attention = (
        2 * width  # affine pre-norm
        + _linear_params(width, width)
        + _linear_params(width, 2 * width)
        + _linear_params(width, width)
        + qk_norms
    )
    mlp = _linear_params(width, hidden) + _linear_params(hidden, width)
    modulation = _linear_params(width, 6 * width)
    block = self_attention + cross_attention + mlp + modulation
    final = _linear_params(width, 2 * width) + _linear_params(width, patch_dim)
    return embeddings + cfg.depth * block + final


def dit_forward_flops(
    cfg: DiTConfig,
    in_channels: int,
    text_dim: int,
    num_tokens: int,
    text_tokens: int,
    time_groups: int = 1,
) -> int:
    """Forward FLOPs for one sample.

    num_tokens: spacetime tokens the DiT attends over (latent T·H·W / patch volume);
    text_tokens: caption length L (padded tokens are computed too);
    time_groups: 1 for one time per sample, or the token frames for one time per latent frame
    (the time embedding and every adaLN modulation then run once per frame).
    """
    width, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    patch_dim = in_channels * math.prod(cfg.patch_size)
    tokens, text = num_tokens, text_tokens

    def matmul(rows: int, fan_in: int, fan_out: int) -> int:
        return 2 * rows * fan_in * fan_out

    embeddings = (
        matmul(tokens, patch_dim, width)
        + matmul(time_groups, TIME_FREQUENCY_DIM, width)
        + matmul(time_groups, width, width)
        + matmul(text, text_dim, width)
        + matmul(text, width, width)
        + matmul(1, 3 * TIME_FREQUENCY_DIM, width)  # micro-conditions
        + matmul(1, width, width)
    )
    self_attention = (
        matmul(tokens, width, 3 * width)
        + 4 * tokens * tokens * width  # scores and weighted sum
        + matmul(tokens, width, width)
    )
    cross_attention = (
        matmul(tokens, width, width)
        + matmul(text, width, 2 * width)
        + 4 * tokens * text * width
        + matmul(tokens, width, width)
    )
    mlp = matmul(tokens, width, hidden) + matmul(tokens, hidden, width)
    modulation = matmul(time_groups, width, 6 * width)
    block = self_attention + cross_attention + mlp + modulation
    final = matmul(time_groups, width, 2 * width) + matmul(tokens, width, patch_dim)
    return embeddings + cfg.depth * block + final


def dit_train_flops(
    cfg: DiTConfig,
    in_channels: int,
    text_dim: int,
    num_tokens: int,
    text_tokens: int,
    time_groups: int = 1,
) -> int:
    """Forward + backward FLOPs for one sample: backward costs twice the forward."""
    return 3 * dit_forward_flops(cfg, in_channels, text_dim, num_tokens, text_tokens, time_groups)


def peak_flops(device: torch.device | str) -> float | None:
    """Datasheet dense bf16 peak FLOP/s of a known NVIDIA GPU, else None.

    None for CPUs and unlisted GPUs: their peak depends on SKU, clocks and thread count, and a
    guessed number would make MFU look meaningful when it is not.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _BF16_PEAK_FLOPS if key in name), None)


def estimate_mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Achieved / peak FLOP/s; flops_per_step and peak_flops must cover the same devices."""
    if seconds_per_step <= 0 or peak_flops <= 0:
        raise ValueError(
            f"seconds_per_step ({seconds_per_step}) and peak_flops ({peak_flops}) must be > 0"
        )
    return flops_per_step / seconds_per_step / peak_flops

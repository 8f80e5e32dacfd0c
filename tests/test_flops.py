"""Analytic parameter and FLOP counts agree with the real module and torch's FLOP counter."""

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from model.dit import DIT_SIZES, DiT, count_params, dit_config
from model.flops import (
    dit_forward_flops,
    dit_param_count,
    dit_train_flops,
    estimate_mfu,
    peak_flops,
)

IN_CHANNELS, TEXT_DIM, TEXT_TOKENS = 4, 32, 7
aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
    # Model FLOPs, as MFU counts them: the gradients' matmuls (twice the forward), not the
    # attention scores the kernel recomputes instead of storing them.
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """torch's counter, taught the CPU flash-attention kernels that it does not list."""
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
        },
    )


@pytest.mark.parametrize("size", list(DIT_SIZES))
def test_param_count_equals_the_module_for_every_size(size):
    cfg = dit_config(size)
    with torch.device("meta"):
        model = DiT(cfg, in_channels=16, text_dim=4096)
    assert dit_param_count(cfg, 16, 4096) == count_params(model)


@pytest.mark.parametrize(
    "overrides", [{"qk_norm": False}, {"patch_size": [2, 2, 2]}, {"mlp_ratio": 2.5}]
)
def test_param_count_follows_config_variants(overrides):
    cfg = dataclasses.replace(dit_config("tiny"), **overrides)
    assert dit_param_count(cfg, IN_CHANNELS, TEXT_DIM) == count_params(
        DiT(cfg, IN_CHANNELS, TEXT_DIM)
    )


@pytest.mark.parametrize(
    "size, patch_size, latent_shape, per_frame_times",
    [
        ("tiny", [1, 2, 2], (1, 4, 4), False),
        ("tiny", [1, 2, 2], (3, 8, 6), False),
        ("tiny", [1, 2, 2], (5, 6, 10), False),
        ("tiny", [2, 2, 2], (4, 8, 8), False),
        ("tiny", [1, 2, 2], (5, 6, 10), True),
        ("tiny", [2, 2, 2], (4, 8, 8), True),
        ("micro", [1, 2, 2], (5, 8, 8), False),
        ("mini", [1, 2, 2], (5, 8, 8), False),
    ],
)
def test_flops_match_torch_flop_counter(size, patch_size, latent_shape, per_frame_times):
    """Forward and training FLOPs within 5% of torch's count, as the scaling sweep uses them."""
    cfg = dataclasses.replace(dit_config(size), patch_size=patch_size)
    torch.manual_seed(0)
    model = DiT(cfg, IN_CHANNELS, TEXT_DIM)
    batch = 2
    x = torch.randn(batch, IN_CHANNELS, *latent_shape)
    text, mask = torch.randn(batch, TEXT_TOKENS, TEXT_DIM), torch.ones(batch, TEXT_TOKENS).bool()
    grid = [n // p for n, p in zip(latent_shape, patch_size, strict=True)]
    num_tokens = math.prod(grid)
    t = torch.rand(batch, latent_shape[0]) if per_frame_times else torch.rand(batch)
    time_groups = grid[0] if per_frame_times else 1

    with flop_counter() as forward_counter:
        velocity = model(
            x,
            t,
            text,
            mask,
            fps=torch.full((batch,), 8.0),
            native_size=torch.tensor([[240.0, 320.0]] * batch),
        )
    forward = dit_forward_flops(cfg, IN_CHANNELS, TEXT_DIM, num_tokens, TEXT_TOKENS, time_groups)
    assert forward_counter.get_total_flops() / batch == pytest.approx(forward, rel=0.05)

    with flop_counter() as backward_counter:
        velocity.square().mean().backward()
    train = dit_train_flops(cfg, IN_CHANNELS, TEXT_DIM, num_tokens, TEXT_TOKENS, time_groups)
    measured_train = (
        forward_counter.get_total_flops() + backward_counter.get_total_flops()
    ) / batch
    assert measured_train == pytest.approx(train, rel=0.05)


def test_mfu_is_achieved_over_peak_and_cpu_has_no_peak():
    flops = dit_train_flops(dit_config("1b"), 16, 4096, num_tokens=4096, text_tokens=256)
    assert estimate_mfu(8 * flops, seconds_per_step=2.0, peak_flops=8 * flops) == 0.5
    assert peak_flops("cpu") is None
    with pytest.raises(ValueError, match="seconds_per_step"):
        estimate_mfu(flops, seconds_per_step=0.0, peak_flops=1e15)

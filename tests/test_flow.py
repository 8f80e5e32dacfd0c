"""Flow matching maths: interpolation, time shift and sampling, the frame-weighted loss, caption
dropout, and the Euler sampler with classifier-free guidance."""

import pytest
import torch
from models import perturbed_tiny_dit
from torch import nn

from model.dit import DiT
from model.flow import (
    FlowConfig,
    drop_captions,
    euler_sample,
    interpolate,
    sample_timesteps,
    time_shift,
    training_loss,
)

IN_CHANNELS, TEXT_DIM = 4, 32


def trained_dit() -> DiT:
    """The tiny DiT with every weight perturbed, so the caption and every frame matter."""
    return perturbed_tiny_dit(IN_CHANNELS, TEXT_DIM)


class StraightLineTo(nn.Module):
    """The exact velocity field of flow matching onto one data point: v = (x_t - x0) / t."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.times_seen: list[float] = []

    def forward(self, x, t, text, text_mask):
        self.times_seen.append(t[0].item())
        return (x - self.x0) / t[:, None, None, None, None]


def test_interpolate_hits_data_at_0_and_noise_at_1_per_frame():
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 3, 4, 5, 5)
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(2)), noise)
    mixed = interpolate(x0, noise, torch.tensor([[0.0, 1.0, 0.5, 0.0]] * 2))
    torch.testing.assert_close(mixed[:, :, 0], x0[:, :, 0])
    torch.testing.assert_close(mixed[:, :, 1], noise[:, :, 1])
    torch.testing.assert_close(mixed[:, :, 2], (x0[:, :, 2] + noise[:, :, 2]) / 2)
    with pytest.raises(ValueError, match=r"t must be \(B,\) = \(2,\) or \(B, T\) = \(2, 4\)"):
        interpolate(x0, noise, torch.zeros(2, 3))


def test_time_shift_is_monotone_identity_at_base_and_noisier_above():
    cfg = FlowConfig(shift_base_tokens=256)
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(time_shift(t, 256, cfg), t)
    shifted = time_shift(t, 4 * 256, cfg)  # shift 2
    assert (shifted.diff() > 0).all()
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > t[1:-1]).all()
    assert shifted[50].item() == pytest.approx(2 * 0.5 / (1 + 0.5))


def test_sample_timesteps_lie_in_the_open_interval_and_shift_up_with_tokens():
    cfg = FlowConfig()
    base = sample_timesteps(20000, 256, cfg, torch.Generator().manual_seed(0))
    more = sample_timesteps(20000, 4096, cfg, torch.Generator().manual_seed(0))
    assert base.shape == (20000,)
    assert ((base > 0) & (base < 1)).all() and ((more > 0) & (more < 1)).all()
    assert base.mean().item() == pytest.approx(0.5, abs=0.01)  # logit-normal(0, 1) is symmetric
    assert more.mean() > base.mean() + 0.2
    again = sample_timesteps(20000, 256, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(base, again)


def test_frame_weight_excludes_frames_from_loss_and_denominator():
    model = trained_dit()
    torch.manual_seed(1)
    x0, noise = torch.randn(2, IN_CHANNELS, 3, 4, 4), torch.randn(2, IN_CHANNELS, 3, 4, 4)
    text, mask = torch.randn(2, 5, TEXT_DIM), torch.ones(2, 5, dtype=torch.bool)
    t = torch.tensor([[0.0, 0.5, 0.9], [0.3, 0.3, 0.7]])  # per frame, a clean first frame

    with torch.no_grad():
        error = (model(interpolate(x0, noise, t), t, text, mask) - (noise - x0)).square()
        plain = training_loss(model, x0, text, mask, t, noise)
        weighted = training_loss(
            model, x0, text, mask, t, noise, frame_weight=torch.tensor([[1, 0, 1], [0, 1, 0]])
        )
    torch.testing.assert_close(plain, error.mean(dim=(1, 2, 3, 4)))
    torch.testing.assert_close(weighted[0], error[0][:, [0, 2]].mean())
    torch.testing.assert_close(weighted[1], error[1][:, 1].mean())


def test_drop_captions_swaps_whole_captions_for_the_padded_empty_one():
    torch.manual_seed(0)
    text, mask = torch.randn(64, 6, TEXT_DIM), torch.ones(64, 6, dtype=torch.bool)
    null_text, null_mask = torch.randn(2, TEXT_DIM), torch.tensor([True, True])
    padded_null = torch.cat([null_text, torch.zeros(4, TEXT_DIM)])

    kept, kept_mask = drop_captions(text, mask, null_text, null_mask, p=0.0)
    assert torch.equal(kept, text) and torch.equal(kept_mask, mask)

    dropped, dropped_mask = drop_captions(text, mask, null_text, null_mask, 0.5, _seeded(0))
    is_null = (dropped == padded_null).all(dim=(1, 2))
    is_original = (dropped == text).all(dim=(1, 2))
    assert (is_null ^ is_original).all()
    assert 16 < is_null.sum() < 48
    assert (dropped_mask[is_null] == torch.tensor([True, True, False, False, False, False])).all()
    again, _ = drop_captions(text, mask, null_text, null_mask, 0.5, _seeded(0))
    assert torch.equal(dropped, again)

    # A null caption longer than the captions is truncated.
    long_null = torch.randn(1, 9, TEXT_DIM)
    truncated, _ = drop_captions(text, mask, long_null, torch.ones(1, 9, dtype=torch.bool), 1.0)
    assert torch.equal(truncated, long_null[:, :6].expand(64, -1, -1))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("steps, shape", [(1, (1, 4, 4)), (7, (3, 4, 6))])
def test_euler_sample_with_the_exact_velocity_lands_on_the_data(steps, shape):
    cfg = FlowConfig(shift_base_tokens=16)
    torch.manual_seed(0)
    x0 = torch.randn(1, IN_CHANNELS, *shape)
    noise = torch.randn(2, IN_CHANNELS, *shape)
    text, mask = torch.randn(2, 5, TEXT_DIM), torch.ones(2, 5, dtype=torch.bool)
    model = StraightLineTo(x0)

    sample = euler_sample(
        model, noise, text, mask, torch.zeros(3, TEXT_DIM), torch.ones(3, dtype=torch.bool), cfg,
        steps=steps, cfg_scale=4.0, num_tokens=64,
    )  # fmt: skip
    torch.testing.assert_close(sample, x0.expand_as(sample), atol=1e-5, rtol=1e-5)
    expected_times = time_shift(torch.linspace(1, 0, steps + 1), 64, cfg)[:-1]
    torch.testing.assert_close(torch.tensor(model.times_seen), expected_times)


def test_classifier_free_guidance_combines_conditional_and_empty_caption_predictions():
    model = trained_dit()
    cfg = FlowConfig()
    torch.manual_seed(1)
    noise = torch.randn(2, IN_CHANNELS, 2, 4, 4)
    text = torch.randn(2, 6, TEXT_DIM)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    null_text, null_mask = torch.randn(1, 2, TEXT_DIM), torch.ones(1, 2, dtype=torch.bool)
    padded_null = torch.cat([null_text, torch.zeros(1, 4, TEXT_DIM)], dim=1).expand(2, -1, -1)
    padded_mask = torch.tensor([[True, True] + [False] * 4] * 2)

    with torch.no_grad():
        t = torch.ones(2)
        v_cond = model(noise, t, text, mask)
        v_uncond = model(noise, t, padded_null, padded_mask)
    assert not torch.allclose(v_cond, v_uncond, atol=1e-3)  # the caption matters

    def one_step(scale: float) -> torch.Tensor:
        return euler_sample(
            model, noise, text, mask, null_text, null_mask, cfg, steps=1, cfg_scale=scale
        )

    torch.testing.assert_close(one_step(1.0), noise - v_cond)
    guided = v_uncond + 3.0 * (v_cond - v_uncond)
    torch.testing.assert_close(one_step(3.0), noise - guided, atol=1e-5, rtol=1e-5)


def test_euler_sample_runs_the_dit_at_any_shape():
    model = trained_dit()
    torch.manual_seed(1)
    text, mask = torch.randn(1, 4, TEXT_DIM), torch.ones(1, 4, dtype=torch.bool)
    for shape in [(1, 4, 4), (3, 6, 8)]:
        noise = torch.randn(1, IN_CHANNELS, *shape)
        null = (torch.zeros(4, TEXT_DIM), torch.ones(4, dtype=torch.bool))
        sample = euler_sample(model, noise, text, mask, *null, FlowConfig(), steps=3)
        assert sample.shape == noise.shape and torch.isfinite(sample).all()


def test_euler_sample_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        euler_sample(
            StraightLineTo(torch.zeros(1)), torch.randn(1, 1, 1, 2, 2), torch.zeros(1, 1, 2),
            torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 2), torch.ones(1, dtype=torch.bool),
            FlowConfig(), steps=0,
        )  # fmt: skip

"""The DiT: any latent shape in one process, per-frame times, adaLN-Zero, relative 3D RoPE,
masked attention and the size registry behind the `model=<size>` presets."""

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from model.attention import attention
from model.dit import DIT_SIZES, DiT, apply_rope, dit_config, rope_cos_sin, token_positions
from train.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
IN_CHANNELS, TEXT_DIM = 4, 32

register_configs()


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


def make_dit(trained: bool = True, **overrides) -> DiT:
    """The tiny DiT; `trained` perturbs every weight (the zero-initialised ones included) so that
    every path through the model matters, as it does after training."""
    torch.manual_seed(0)
    model = DiT(dataclasses.replace(dit_config("tiny"), **overrides), IN_CHANNELS, TEXT_DIM)
    if trained:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def caption(batch: int = 2, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randn(batch, length, TEXT_DIM)
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (batch, 1))
    return text, mask


@pytest.mark.parametrize("frames, height, width", [(1, 4, 4), (3, 8, 6), (5, 6, 10)])
def test_any_latent_shape_gives_a_velocity_of_the_same_shape(frames, height, width):
    model = make_dit()
    torch.manual_seed(1)
    x = torch.randn(2, IN_CHANNELS, frames, height, width)
    velocity = model(x, torch.rand(2), *caption())
    assert velocity.shape == x.shape
    assert torch.isfinite(velocity).all()
    assert velocity.std() > 0.1


def test_untrained_model_predicts_exactly_zero():
    model = make_dit(trained=False)
    torch.manual_seed(1)
    velocity = model(torch.randn(2, IN_CHANNELS, 3, 8, 6), torch.rand(2), *caption())
    assert torch.equal(velocity, torch.zeros_like(velocity))


def test_per_frame_times_condition_each_frame():
    model = make_dit()
    torch.manual_seed(1)
    x, text = torch.randn(2, IN_CHANNELS, 3, 4, 4), caption()
    t = torch.tensor([0.3, 0.8])
    same_per_frame = model(x, t[:, None].expand(2, 3), *text)
    torch.testing.assert_close(same_per_frame, model(x, t, *text))

    # A clean first frame (t = 0) with noisy others is neither all-clean nor all-noisy.
    mixed = model(x, torch.tensor([[0.0, 1.0, 1.0]] * 2), *text)
    assert not torch.allclose(mixed, model(x, torch.zeros(2), *text), atol=1e-3)
    assert not torch.allclose(mixed, model(x, torch.ones(2), *text), atol=1e-3)


def test_frames_sharing_a_temporal_patch_use_their_mean_time():
    model = make_dit(patch_size=[2, 2, 2])
    torch.manual_seed(1)
    x, text = torch.randn(1, IN_CHANNELS, 4, 4, 4), caption(batch=1)
    per_frame = model(x, torch.tensor([[0.2, 0.4, 0.6, 0.8]]), *text)
    per_patch = model(x, torch.tensor([[0.3, 0.3, 0.7, 0.7]]), *text)
    # t enters as t * 1000, so float rounding of the mean shows at ~1e-5.
    torch.testing.assert_close(per_frame, per_patch, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "shape, t_shape, message",
    [
        ((2, IN_CHANNELS, 3, 7, 6), (2,), r"\(T, H, W\) = \(3, 7, 6\) must be divisible"),
        ((2, IN_CHANNELS + 1, 3, 8, 6), (2,), r"latents must be \(B, C=4"),
        ((2, IN_CHANNELS, 3, 8, 6), (2, 2), r"t must be \(B,\)"),
    ],
)
def test_bad_inputs_are_named(shape, t_shape, message):
    model = make_dit(trained=False)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(shape), torch.rand(t_shape), *caption())


def test_every_parameter_learns():
    """adaLN-Zero opens the gradient path in three steps: the output layer, then the gates and
    cross-attention projections, then what feeds them (timestep and caption embedders, the
    given-frame vector); a fourth reaches the micro-condition MLP behind its zeroed output."""
    model = make_dit(trained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    x, text = torch.randn(2, IN_CHANNELS, 3, 4, 4), caption()
    given = torch.tensor([[True, False, False], [False, False, False]])
    t = torch.rand(2, 1).expand(2, 3).masked_fill(given, 0.0)
    micro = {"fps": torch.tensor([8.0, 24.0]), "native_size": torch.tensor([[240.0, 320.0]] * 2)}
    target = torch.randn_like(x)
    for _ in range(4):
        optimizer.zero_grad()
        (model(x, t, *text, given=given, **micro) - target).square().mean().backward()
        optimizer.step()
    stuck = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not stuck


def test_token_positions_run_frame_major_through_each_grid_in_turn():
    grids = [(2, 3, 4), (1, 1, 5), (3, 2, 2)]
    expected = [position for grid in grids for position in itertools.product(*map(range, grid))]
    assert token_positions(grids).tolist() == [list(map(float, p)) for p in expected]


def test_rope_scores_depend_only_on_token_offsets():
    """Same content everywhere: after RoPE, q·k is a function of the (t, h, w) offset alone."""
    grid, head_dim = (4, 5, 6), 64
    torch.manual_seed(0)
    tokens = torch.randn(1, 1, 1, head_dim).expand(1, 4 * 5 * 6, 1, head_dim)
    q = apply_rope(tokens, *rope_cos_sin(token_positions([grid]), head_dim, theta=10000.0))
    scores = (q[0, :, 0] @ q[0, :, 0].T).reshape(*grid, *grid)

    for axis in range(3):
        # Shifting both tokens by one step along `axis` keeps every score.
        first = [slice(None)] * 6
        first[axis], first[axis + 3] = slice(None, -1), slice(None, -1)
        shifted = [slice(None)] * 6
        shifted[axis], shifted[axis + 3] = slice(1, None), slice(1, None)
        torch.testing.assert_close(scores[tuple(first)], scores[tuple(shifted)])
        # ...while a different offset along the axis changes it.
        assert not torch.allclose(scores[(0, 0, 0) + (0, 0, 0)], scores[(0, 0, 0) + _step(axis)])


def _step(axis: int) -> tuple[int, int, int]:
    return tuple(int(i == axis) for i in range(3))


def test_attention_matches_softmax_reference_and_masks_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    reference = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
    torch.testing.assert_close(attention(q, k, v), reference)

    key_mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    masked = attention(q, k, v, key_mask)
    torch.testing.assert_close(masked[:1], attention(q[:1], k[:1, :4], v[:1, :4]))
    torch.testing.assert_close(masked[1:], reference[1:])


def test_attention_with_no_valid_key_is_zero_not_nan():
    torch.manual_seed(0)
    q = torch.randn(2, 5, 2, 8, requires_grad=True)
    k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    out = attention(q, k, v, torch.tensor([[False] * 3, [True, False, True]]))
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        attention(q, k, v, torch.ones(2, 4, dtype=torch.bool))


def test_sizes_follow_the_rule_and_are_the_model_presets():
    for size, cfg in DIT_SIZES.items():
        assert cfg.depth == cfg.num_heads == max(1, cfg.width // 64), size
        assert cfg.width // cfg.num_heads == min(64, cfg.width), size
        preset = OmegaConf.to_container(compose_config(f"model={size}").model)
        assert preset == dataclasses.asdict(cfg) | {"pretrained": None}, size
    presets = (ROOT / "conf/model").glob("*.yaml")
    # The sizes are not repeated as files: the only YAML presets are the pretrained models,
    # which follow their published configs, not the rule.
    assert all("pretrained" in OmegaConf.load(p) for p in presets)
    with pytest.raises(
        ValueError, match="unknown DiT size 'huge'; known sizes: pico, nano, micro, tiny"
    ):
        dit_config("huge")

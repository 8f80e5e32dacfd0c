"""Frame conditioning and micro-conditions: the drawn masks, zero loss (and gradient) on given
frames, the sampler keeping given frames exactly, and a fresh DiT ignoring the new inputs."""

import pytest
import torch
from models import perturbed_tiny_dit

from model.conditioning import ConditioningConfig, draw_given_frames, given_mask
from model.dit import DiT, dit_config
from model.flow import FlowConfig, euler_sample, training_loss

IN_CHANNELS, TEXT_DIM = 4, 32


def perturbed_dit() -> DiT:
    return perturbed_tiny_dit(IN_CHANNELS, TEXT_DIM)


def caption(batch: int = 2):
    return torch.randn(batch, 5, TEXT_DIM), torch.ones(batch, 5, dtype=torch.bool)


@pytest.mark.parametrize(
    ("mode", "frames", "k", "expected"),
    [
        ("t2v", 5, 2, "....."),
        ("i2v", 5, 2, "#...."),
        ("extend_forward", 5, 2, "##..."),
        ("extend_backward", 5, 2, "...##"),
        ("connect", 5, 2, "##.##"),
        ("connect", 4, 2, "#..#"),  # k shrinks so a frame stays noisy
        ("connect", 2, 1, ".."),  # too short: nothing given
        ("extend_forward", 3, 5, "##."),
        ("i2v", 1, 1, "."),  # an image is always text-to-image
    ],
)
def test_each_mode_gives_its_frames(mode, frames, k, expected):
    assert "".join("#" if g else "." for g in given_mask(mode, frames, k).tolist()) == expected


def test_drawn_masks_follow_the_probabilities_and_leave_a_frame_noisy():
    cfg = ConditioningConfig(t2v=0.5, i2v=0.25, random_frames=0.25, given_frames=[1, 3])
    given = draw_given_frames(4000, 4, cfg, torch.Generator().manual_seed(0))
    none = ~given.any(dim=1)
    first_only = given[:, 0] & (given.sum(dim=1) == 1)
    assert (given.sum(dim=1) <= 3).all()
    assert none.float().mean().item() == pytest.approx(0.5, abs=0.03)
    # i2v, plus random_frames that happened to pick frame 0 alone (k = 1, 1/4 of those).
    assert first_only.float().mean().item() == pytest.approx(0.25 + 0.25 / 3 / 4, abs=0.03)
    again = draw_given_frames(4000, 4, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(given, again)
    assert not draw_given_frames(50, 1, ConditioningConfig(t2v=0.0, i2v=1.0)).any()


def test_bad_probabilities_and_ranges_are_named():
    with pytest.raises(ValueError, match="sum to 1, got t2v=0.5, i2v=0.2"):
        draw_given_frames(2, 4, ConditioningConfig(t2v=0.5, i2v=0.2))
    with pytest.raises(ValueError, match=r"given_frames must be \[min, max\]"):
        draw_given_frames(2, 4, ConditioningConfig(given_frames=[3, 1]))


def test_given_frames_carry_no_loss_and_no_gradient():
    """The loss's gradient w.r.t. the model's output and the noise is exactly zero on given
    frames (and not elsewhere), and the model sees them clean, at time 0, flagged."""
    model = perturbed_dit()
    seen = {}

    def spy(x, t, text, text_mask, **kwargs):
        seen.update(x=x, t=t, **kwargs)
        velocity = model(x, t, text, text_mask, **kwargs)
        velocity.retain_grad()
        seen["velocity"] = velocity
        return velocity

    torch.manual_seed(1)
    x0 = torch.randn(2, IN_CHANNELS, 4, 4, 4)
    noise = torch.randn_like(x0).requires_grad_()
    given = torch.tensor([[True, True, False, False], [False, False, False, True]])
    loss = training_loss(spy, x0, *caption(), torch.tensor([0.3, 0.8]), noise, given=given)
    loss.sum().backward()

    keep = given[:, None, :, None, None].expand_as(x0)
    assert torch.equal(seen["x"][keep], x0[keep])
    assert torch.equal(seen["t"], torch.tensor([[0.0, 0.0, 0.3, 0.3], [0.8, 0.8, 0.8, 0.0]]))
    assert torch.equal(seen["given"], given)
    for grad in (seen["velocity"].grad, noise.grad):
        assert (grad[keep] == 0).all()
        assert (grad[~keep] != 0).all()


def test_sampler_keeps_given_frames_exactly_and_starts_edits_from_the_reference():
    model = perturbed_dit()
    torch.manual_seed(2)
    noise = torch.randn(1, IN_CHANNELS, 4, 4, 4)
    clean = torch.randn_like(noise)
    given = torch.tensor([[True, False, False, True]])
    text, mask = caption(1)
    null = (torch.zeros(1, 1, TEXT_DIM), torch.zeros(1, 1, dtype=torch.bool))
    out = euler_sample(
        model, noise, text, mask, *null, FlowConfig(), steps=4, clean=clean, given=given
    )
    torch.testing.assert_close(out[:, :, 0], clean[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 3], clean[:, :, 3], rtol=0, atol=0)
    assert not torch.allclose(out[:, :, 1], clean[:, :, 1], atol=0.1)
    # SDEdit: a small strength stays near the reference, a full one does not.
    near = euler_sample(
        model, noise, text, mask, *null, FlowConfig(), steps=4, clean=clean, strength=0.05
    )
    far = euler_sample(model, noise, text, mask, *null, FlowConfig(), steps=4, clean=clean)
    assert (near - clean).abs().mean() < 0.2 * (far - clean).abs().mean()
    with pytest.raises(ValueError, match="need clean latents"):
        euler_sample(model, noise, text, mask, *null, FlowConfig(), steps=2, given=given)


def test_fresh_dit_ignores_given_flags_and_micro_conditions_until_trained():
    torch.manual_seed(3)
    model = DiT(dit_config("tiny"), IN_CHANNELS, TEXT_DIM)
    with torch.no_grad():  # open the adaLN path, leave the new inputs at their initial values
        for block in model.blocks:
            block.modulation[-1].weight.normal_(0, 0.05)
        model.final_layer.linear.weight.normal_(0, 0.05)
    x, t, text = torch.randn(2, IN_CHANNELS, 3, 4, 4), torch.rand(2, 3), caption()
    extra = {
        "given": torch.tensor([[True, False, False]] * 2),
        "fps": torch.tensor([8.0, 30.0]),
        "native_size": torch.tensor([[240.0, 320.0], [1080.0, 1920.0]]),
    }
    plain = model(x, t, *text)
    torch.testing.assert_close(model(x, t, *text, **extra), plain)
    with torch.no_grad():
        model.given_embed.normal_()
        model.micro_embed.mlp[-1].weight.normal_(0, 0.05)
    assert not torch.allclose(model(x, t, *text, given=extra["given"]), plain)
    faster = {**extra, "fps": torch.tensor([24.0, 30.0])}
    changed = model(x, t, *text, **faster) - model(x, t, *text, **extra)
    assert changed[0].abs().max() > 1e-4 and changed[1].abs().max() == 0
    with pytest.raises(ValueError, match="pass both or neither"):
        model(x, t, *text, fps=extra["fps"])
    with pytest.raises(ValueError, match=r"given must be bool of shape \(B, T\) = \(2, 3\)"):
        model(x, t, *text, given=torch.ones(2, 4, dtype=torch.bool))

"""Rectified flow matching: noising, the training loss, caption dropout and the Euler sampler.

Convention: t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t noise, and the model predicts the
constant velocity dx_t/dt = noise - x0. Times are drawn logit-normal and then shifted towards noise
for bigger latents (SD3's resolution shift): more latent tokens carry more redundant signal, so the
same noise level destroys less of the content.

Frame conditioning (`given`, (B, T) bool over latent frames): given frames sit at time 0, so they
are the clean latents; the model is told which they are; the loss leaves them out; and the sampler
puts the clean frames back before every step, so they come out exactly as they went in.

`training_loss` also takes a packed batch: lists of samples of different shapes that the DiT runs
as one token sequence; each sample is noised and scored as a batch of one, as it would be alone.

`num_tokens` is the number of spacetime tokens the DiT sees (latent T·H·W / patch volume);
training and sampling must count it the same way. Everything random takes an explicit generator so
results are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class FlowConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift_base_tokens: int = 256  # num_tokens (DiT tokens) at which the time shift is 1
    caption_dropout: float = 0.1  # share of captions replaced by the empty caption (for CFG)
    sample_steps: int = 30
    cfg_scale: float = 5.0


def time_shift(t: Tensor, num_tokens: int, cfg: FlowConfig) -> Tensor:
    """Map t to s·t / (1 + (s-1)·t) with s = sqrt(num_tokens / shift_base_tokens).

    Monotone, fixes 0 and 1, and pushes t towards noise (1) when s > 1.
    """
    shift = math.sqrt(num_tokens / cfg.shift_base_tokens)
    return t / (t + (1 - t) / shift)  # the same map, written to keep t = 0 and t = 1 exact


def sample_timesteps(
    batch_size: int,
    num_tokens: int,
    cfg: FlowConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times (batch_size,) in (0, 1): sigmoid of a normal sample, then time-shifted."""
    sample_device = generator.device if generator is not None else device
    logits = torch.randn(batch_size, generator=generator, device=sample_device)
    t = time_shift(torch.sigmoid(logits * cfg.logit_std + cfg.logit_mean), num_tokens, cfg)
    return t if device is None else t.to(device)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise, with t (B,) or per latent frame (B, T)."""
    t = _broadcast_time(t, x0)
    return (1 - t) * x0 + t * noise


def training_loss(
    model: nn.Module,
    x0: Tensor | list[Tensor],
    text: Tensor,
    text_mask: Tensor,
    t: Tensor,
    noise: Tensor | list[Tensor],
    frame_weight: Tensor | list[Tensor] | None = None,
    given: Tensor | list[Tensor] | None = None,
    model_kwargs: dict | None = None,
) -> Tensor:
    """Per-sample (B,) mean squared error of the predicted velocity against noise - x0.

    frame_weight (B, T) turns the mean over latent frames into a weighted mean, so frames of weight
    0 add nothing to the loss nor to its denominator. given (B, T) bool marks clean conditioning
    frames: their time becomes 0 (t turns per frame), their weight 0, and the model gets
    `given=given`. model_kwargs (e.g. micro-conditions) go to the model. The caller reduces over
    the batch.

    Packed: x0 and noise lists of groups of samples, group g latents of one shape
    (B_g, C, T_g, H_g, W_g); t (S,) for the S samples, group after group; frame_weight and given
    None or lists of the groups' (B_g, T_g); model_kwargs may hold `sequence_length`. Returns
    the (S,) losses.
    """
    model_kwargs = dict(model_kwargs or {})
    if given is not None:
        model_kwargs["given"] = given
    if isinstance(x0, list):
        return _packed_training_loss(
            model, x0, text, text_mask, t, noise, frame_weight, given, model_kwargs
        )
    x_t, t, frame_weight = _noised(x0, noise, t, frame_weight, given)
    velocity = model(x_t, t, text, text_mask, **model_kwargs)
    return _frame_mean_error(velocity, noise - x0, frame_weight)


def _packed_training_loss(
    model: nn.Module,
    x0: list[Tensor],
    text: Tensor,
    text_mask: Tensor,
    t: Tensor,
    noise: list[Tensor],
    frame_weight: list[Tensor] | None,
    given: list[Tensor] | None,
    model_kwargs: dict,
) -> Tensor:
    """training_loss of a packed batch: every group is noised and scored as a dense batch."""
    sizes = [len(group) for group in x0]
    if t.shape != (sum(sizes),):
        raise ValueError(
            f"t must be (S,) = ({sum(sizes)},) for the samples of x0's groups, got {tuple(t.shape)}"
        )
    for name, values in (("noise", noise), ("frame_weight", frame_weight), ("given", given)):
        if values is not None and len(values) != len(x0):
            raise ValueError(
                f"{name} must hold one tensor per group of x0 ({len(x0)}), got {len(values)}"
            )
    noised = [
        _noised(x, n, times, _of_group(frame_weight, g), _of_group(given, g))
        for g, (x, n, times) in enumerate(zip(x0, noise, t.split(sizes), strict=True))
    ]
    x_t, t, frame_weight = zip(*noised, strict=True)
    velocity = model(list(x_t), list(t), text, text_mask, **model_kwargs)
    losses = [
        _frame_mean_error(v, n - x, weight)
        for v, n, x, weight in zip(velocity, noise, x0, frame_weight, strict=True)
    ]
    return torch.cat(losses)


def _of_group(values: list[Tensor] | None, g: int) -> Tensor | None:
    return None if values is None else values[g]


def _noised(
    x0: Tensor, noise: Tensor, t: Tensor, frame_weight: Tensor | None, given: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """x_t, the times the model gets and the loss's frame weights (given frames: 0 and 0)."""
    if given is not None:
        t, frame_weight = _condition_on_given(t, frame_weight, given, x0)
    return interpolate(x0, noise, t), t, frame_weight


def _frame_mean_error(velocity: Tensor, target: Tensor, frame_weight: Tensor | None) -> Tensor:
    """Per-sample (B,) squared error, averaged over each latent frame and then over the frames
    (weighted by frame_weight (B, T) when given)."""
    per_frame = (velocity.float() - target.float()).square().mean(dim=(1, 3, 4))  # (B, T)
    if frame_weight is None:
        return per_frame.mean(dim=1)
    if frame_weight.shape != per_frame.shape:
        raise ValueError(
            f"frame_weight must be (B, T) = {tuple(per_frame.shape)}, "
            f"got {tuple(frame_weight.shape)}"
        )
    weight = frame_weight.to(per_frame.dtype)
    total_weight = weight.sum(dim=1)
    return (per_frame * weight).sum(dim=1) / total_weight.masked_fill(total_weight == 0, 1.0)


def _condition_on_given(
    t: Tensor, frame_weight: Tensor | None, given: Tensor, x0: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-frame times with 0 on given frames, and frame weights with 0 on them."""
    batch, frames = x0.shape[0], x0.shape[2]
    if given.shape != (batch, frames) or given.dtype != torch.bool:
        raise ValueError(
            f"given must be bool (B, T) = ({batch}, {frames}), "
            f"got {given.dtype} {tuple(given.shape)}"
        )
    t = t[:, None].expand(batch, frames) if t.ndim == 1 else t
    t = t.masked_fill(given, 0.0)
    weight = torch.ones_like(t) if frame_weight is None else frame_weight.to(t.dtype)
    return t, weight.masked_fill(given, 0.0)


def drop_captions(
    text: Tensor,
    text_mask: Tensor,
    null_text: Tensor,
    null_mask: Tensor,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Replace each sample's caption (B, L, D) by the empty caption with probability p.

    null_text is (1, L0, D) or (L0, D) with null_mask (1, L0) or (L0,); it is padded (masked out)
    or truncated to L.
    """
    null_text, null_mask = _null_caption_like(text, null_text, null_mask)
    sample_device = generator.device if generator is not None else text.device
    drop = torch.rand(text.shape[0], generator=generator, device=sample_device).to(text.device) < p
    return (
        torch.where(drop[:, None, None], null_text, text),
        torch.where(drop[:, None], null_mask, text_mask),
    )


def guided_velocity(
    model: nn.Module,
    x: Tensor,
    t: Tensor,
    text: Tensor,
    text_mask: Tensor,
    null_text: Tensor,
    null_mask: Tensor,
    cfg_scale: float,
    model_kwargs: dict | None = None,
) -> Tensor:
    """Classifier-free guidance v_uncond + scale (v_cond - v_uncond), both from one batched forward.

    null_text/null_mask must already have text's shape (euler_sample prepares them); model_kwargs
    are per-sample tensors, given to both halves.
    """
    model_kwargs = model_kwargs or {}
    if cfg_scale == 1.0:  # guidance is a no-op: skip the unconditional half
        return model(x, t, text, text_mask, **model_kwargs)
    velocity = model(
        torch.cat([x, x]),
        torch.cat([t, t]),
        torch.cat([text, null_text]),
        torch.cat([text_mask, null_mask]),
        **{name: torch.cat([value, value]) for name, value in model_kwargs.items()},
    )
    v_cond, v_uncond = velocity.chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(
    model: nn.Module,
    noise: Tensor,
    text: Tensor,
    text_mask: Tensor,
    null_text: Tensor,
    null_mask: Tensor,
    cfg: FlowConfig,
    steps: int | None = None,
    cfg_scale: float | None = None,
    num_tokens: int | None = None,
    clean: Tensor | None = None,
    given: Tensor | None = None,
    strength: float = 1.0,
    model_kwargs: dict | None = None,
) -> Tensor:
    """Integrate dx/dt = v from t = strength to t = 0 with Euler steps on the time-shifted grid;
    returns the sampled latents (B, C, T, H, W), the shape of `noise`.

    clean: reference latents of noise's shape. Its `given` (B, T) frames are put back before every
    step (and at the end) and sit at time 0, so they come out unchanged. With strength < 1
    (SDEdit) the run starts from clean noised to the shifted time of `strength` rather than from
    pure noise: 1 is text-to-video, smaller keeps more of the reference.
    num_tokens must be the count training used for this latent shape; None takes every latent
    position T·H·W as a token (right for patch size 1).
    """
    steps = cfg.sample_steps if steps is None else steps
    cfg_scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    num_tokens = math.prod(noise.shape[2:]) if num_tokens is None else num_tokens
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if (given is not None or strength < 1.0) and (clean is None or clean.shape != noise.shape):
        raise ValueError(
            f"given frames and strength < 1 need clean latents of shape {tuple(noise.shape)}, "
            f"got {None if clean is None else tuple(clean.shape)}"
        )
    model_kwargs = dict(model_kwargs or {})
    null_text, null_mask = _null_caption_like(text, null_text, null_mask)
    times = time_shift(
        torch.linspace(strength, 0.0, steps + 1, device=noise.device), num_tokens, cfg
    )
    batch, frames = noise.shape[0], noise.shape[2]
    x = noise if strength == 1.0 else interpolate(clean, noise, times[0].expand(batch))
    if given is not None:
        model_kwargs["given"] = given
        keep = given[:, None, :, None, None]
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        t_batch = t.expand(batch)
        if given is not None:
            x = torch.where(keep, clean, x)
            t_batch = t.expand(batch, frames).masked_fill(given, 0.0)
        velocity = guided_velocity(
            model, x, t_batch, text, text_mask, null_text, null_mask, cfg_scale, model_kwargs
        )
        x = x + (t_next - t) * velocity
    return x if given is None else torch.where(keep, clean, x)


def _broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    batch, frames = x.shape[0], x.shape[2]
    if t.shape == (batch,):
        return t.to(x.dtype)[:, None, None, None, None]
    if t.shape == (batch, frames):
        return t.to(x.dtype)[:, None, :, None, None]
    raise ValueError(
        f"t must be (B,) = ({batch},) or (B, T) = ({batch}, {frames}) for latents "
        f"{tuple(x.shape)}, got {tuple(t.shape)}"
    )


def _null_caption_like(text: Tensor, null_text: Tensor, null_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The empty caption padded/truncated to text's length and expanded to its batch."""
    if null_text.ndim == 2:
        null_text, null_mask = null_text[None], null_mask[None]
    if null_text.ndim != 3 or null_text.shape[0] != 1 or null_text.shape[2] != text.shape[2]:
        raise ValueError(
            f"null_text must be (1, L, {text.shape[2]}) or (L, {text.shape[2]}), "
            f"got {tuple(null_text.shape)}"
        )
    if null_mask.shape != null_text.shape[:2]:
        raise ValueError(
            f"null_mask must be {tuple(null_text.shape[:2])} to match null_text, "
            f"got {tuple(null_mask.shape)}"
        )
    batch, length = text.shape[:2]
    null_text = null_text[:, :length].to(device=text.device, dtype=text.dtype)
    null_mask = null_mask[:, :length].to(device=text.device, dtype=torch.bool)
    missing = length - null_text.shape[1]
    if missing > 0:
        null_text = torch.cat([null_text, null_text.new_zeros(1, missing, text.shape[2])], dim=1)
        null_mask = torch.cat([null_mask, null_mask.new_zeros(1, missing)], dim=1)
    return null_text.expand(batch, -1, -1), null_mask.expand(batch, -1)

"""Video autoencoders: map pixels (B, 3, T, H, W) in [-1, 1] to the latents the DiT denoises, and back.

Two interchangeable implementations share one API (encode / decode / calibrate and the compression
attributes), so the trainer never needs to know which one it holds:

- `CausalVideoVAE`: our small, trainable causal 3D convolutional VAE. Time convolutions only look at
  the past, so frame 0 is encoded on its own: an image is a 1-frame video, and a video of
  1 + k * temporal_compression frames gives 1 + k latent frames.
- `DiffusersVideoAutoencoder`: a frozen adapter over a pretrained diffusers video VAE (Wan, HunyuanVideo,
  CogVideoX, ...) loaded from a local folder.

Latents leave `encode` normalised, `(z - latent_shift) / latent_scale` per channel, so the DiT sees
roughly unit-variance inputs whatever the autoencoder; `decode` undoes it. Neither clamps its output:
clamp to [-1, 1] when you turn a decoded video into pixels.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class AutoencoderConfig:
    # "causal_vae" (ours, trainable) or "diffusers" (pretrained, from a local folder; then only
    # pretrained_path matters: channels and compressions come from the pretrained model's config).
    kind: str = "causal_vae"
    latent_channels: int = 4
    base_channels: int = 32
    # Width of each resolution level as a multiple of base_channels; one downsample between levels,
    # so len(channel_multipliers) - 1 == log2(max(spatial_compression, temporal_compression)).
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 1  # per level, in the encoder and the decoder
    spatial_compression: int = 8  # power of two
    temporal_compression: int = 4  # power of two (1 = no temporal compression)
    kl_weight: float = 1e-6
    # Our VAE encodes and decodes a clip in chunks of this many latent frames (0: whole clips),
    # each causal convolution carrying its last input frames over to the next chunk: the result
    # is the whole-clip pass, and the activations' memory is set by the chunk, not the clip.
    chunk_latent_frames: int = 16
    # Frames wider or taller than tile_latents latent pixels are encoded and decoded in square
    # tiles of that side, overlapping by tile_overlap_latents and blended linearly across the
    # overlap, so memory is set by the tile, not the frame (0: whole frames). Unlike temporal
    # chunks this changes the result a little (each tile normalises and attends on its own),
    # which the blend keeps seamless. The diffusers adapter hands it to the VAE's own tiling.
    tile_latents: int = 0
    tile_overlap_latents: int = 4
    checkpoint: str | None = None  # safetensors file of our VAE's weights
    pretrained_path: str | None = None  # local diffusers folder when kind == "diffusers"


class VideoAutoencoder(nn.Module):
    """The shared API: shape rules, latent normalisation and its calibration.

    Subclasses set `latent_channels`, `spatial_compression`, `temporal_compression` and implement
    `_encode_raw` (pixels -> unnormalised mean, logvar) and `_decode_raw` (unnormalised latents -> pixels).
    """

    latent_channels: int
    spatial_compression: int
    temporal_compression: int

    def _init_normalisation(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        # Buffers, so the calibration travels with the weights in every state_dict.
        self.register_buffer("latent_shift", shift.float().clone())
        self.register_buffer("latent_scale", scale.float().clone())

    def _encode_raw(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(B, 3, T, H, W) -> (B, C, T', H', W'); raises ValueError if the shape does not fit."""
        if len(video_shape) != 5 or video_shape[1] != 3:
            raise ValueError(f"expected a video of shape (B, 3, T, H, W), got {tuple(video_shape)}")
        batch, _, frames, height, width = video_shape
        t, s = self.temporal_compression, self.spatial_compression
        if frames < 1 or (frames - 1) % t != 0:
            raise ValueError(
                f"video of shape {tuple(video_shape)} has {frames} frames; this autoencoder needs "
                f"1 + k * {t} frames (1, {1 + t}, {1 + 2 * t}, ...)"
            )
        if height % s != 0 or width % s != 0 or height == 0 or width == 0:
            raise ValueError(
                f"video of shape {tuple(video_shape)} is {height}x{width}; height and width must be "
                f"positive multiples of the spatial compression {s}"
            )
        return (batch, self.latent_channels, 1 + (frames - 1) // t, height // s, width // s)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents of shape (B, {self.latent_channels}, T, H, W), "
                f"got {tuple(latents.shape)}"
            )

    def _channel_view(self, stat: torch.Tensor) -> torch.Tensor:
        return stat.view(1, -1, 1, 1, 1)

    def encode(
        self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, T', H', W').

        Returns the posterior mean, or a posterior sample when `sample` is True.
        """
        mean, logvar = self.posterior(video)
        return _sample_gaussian(mean, logvar, generator) if sample else mean

    def posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (B, 3, T, H, W) in [-1, 1] -> the posterior's mean and log-variance, both in
        the normalised latent space: `mean + exp(logvar / 2) * noise` samples it."""
        self.latent_shape(tuple(video.shape))
        mean, logvar = self._encode_raw(video)
        scale = self._channel_view(self.latent_scale)
        mean = (mean - self._channel_view(self.latent_shift)) / scale
        return mean, logvar - 2 * torch.log(scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels (B, 3, T, H, W), roughly in [-1, 1] and not clamped."""
        self._check_latents(latents)
        z = latents * self._channel_view(self.latent_scale) + self._channel_view(self.latent_shift)
        return self._decode_raw(z)

    @torch.no_grad()
    def calibrate(self, videos: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Set latent_shift / latent_scale to the per-channel mean / std of the posterior means of
        `videos` (one pixel batch (B, 3, T, H, W) or an iterable of them), so that `encode` gives
        ~zero-mean, unit-std latents on that data."""
        batches = [videos] if isinstance(videos, torch.Tensor) else videos
        count, total, total_sq = 0, 0.0, 0.0
        for video in batches:
            self.latent_shape(tuple(video.shape))
            # float64 sums: millions of elements would lose precision in float32.
            mean = self._encode_raw(video)[0].transpose(0, 1).flatten(1).double()
            count += mean.shape[1]
            total = total + mean.sum(dim=1)
            total_sq = total_sq + mean.square().sum(dim=1)
        if count == 0:
            raise ValueError("calibrate() got no video batches")
        channel_mean = total / count
        channel_std = (total_sq / count - channel_mean.square()).clamp_min(1e-12).sqrt()
        self.latent_shift.copy_(channel_mean)
        self.latent_scale.copy_(channel_std)


def _sample_gaussian(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


# --------------------------------------------------------------------------------------------------
# Our causal VAE
# --------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """3D convolution that only looks back in time: the past is padded by repeating the first frame,
    so output frame t depends on input frames <= t * stride only. Space is zero-padded as usual.

    Streaming (`streaming(module)`): a clip comes in consecutive chunks, and each chunk is
    padded with the end of the previous one instead (the frames from where the next output's
    window starts), so the outputs are those of the whole clip."""

    carry: torch.Tensor | None = None  # streaming: the padded input the next output needs
    streaming: bool = False

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=(1, 1, 1)
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(0, kernel_size // 2, kernel_size // 2),
        )
        self.time_padding = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.carry is not None:
            x = torch.cat([self.carry, x], dim=2)
        elif self.time_padding:
            x = F.pad(x, (0, 0, 0, 0, self.time_padding, 0), mode="replicate")
        if self.streaming:
            kernel, stride = self.kernel_size[0], self.stride[0]
            outputs = (x.shape[2] - kernel) // stride + 1
            self.carry = x[:, :, outputs * stride :]
        return super().forward(x)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        # For a CPU batch of one, PyTorch's backend choice (tuned on 2D convolutions) sends small
        # 3D kernels to its im2col kernel, several times slower than oneDNN's: a packed batch
        # encodes many clips alone, so call oneDNN directly.
        if _one_cpu_float_clip(x, weight):
            return torch.mkldnn_convolution(
                x, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(x, weight, bias)


def _one_cpu_float_clip(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        len(x) == 1
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm applied to each frame on its own. Over a whole clip its statistics would pool
    time and leak the future into the past; per frame it stays causal."""

    def __init__(self, channels: int) -> None:
        # Up to 32 groups of at least 4 channels, as in the SD VAE at full width.
        groups = max(
            (g for g in range(1, 33) if channels % g == 0 and channels >= 4 * g), default=1
        )
        super().__init__(groups, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        normalised = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(normalised, "(b t) c h w -> b c t h w", t=frames)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = FrameGroupNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        # Zero-init: every block starts as the identity, which keeps deep stacks stable early on.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv3d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame (causal: frames never mix).
    Used only at the bottleneck, where it gives every latent a global view of its frame."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = FrameGroupNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, frames, height, _ = x.shape
        tokens = rearrange(self.norm(x), "b c t h w -> (b t) (h w) c")
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        out = self.proj(F.scaled_dot_product_attention(q, k, v))
        return x + rearrange(out, "(b t) (h w) c -> b c t h w", t=frames, h=height)


class Downsample(nn.Module):
    """Strided causal conv. In time, stride 2 over the causally padded sequence keeps frame 0 alone:
    1 + 2k frames -> 1 + k."""

    def __init__(self, channels: int, time: bool, space: bool) -> None:
        super().__init__()
        stride = (2 if time else 1, 2 if space else 1, 2 if space else 1)
        self.conv = CausalConv3d(channels, channels, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a causal conv. In time, frame 0 stays alone and every later
    frame is doubled: 1 + k frames -> 1 + 2k, mirroring Downsample. Streaming, only the first
    chunk has a frame 0."""

    streaming: bool = False
    past_first_chunk: bool = False

    def __init__(self, channels: int, time: bool, space: bool) -> None:
        super().__init__()
        self.time, self.space = time, space
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time:
            alone = 0 if self.past_first_chunk else 1
            x = torch.cat([x[:, :, :alone], x[:, :, alone:].repeat_interleave(2, dim=2)], dim=2)
            self.past_first_chunk = self.streaming
        if self.space:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return self.conv(x)


@contextmanager
def streaming(module: nn.Module) -> Iterator[None]:
    """Within it, `module` takes a clip as consecutive chunks of frames and gives what it would
    give the whole clip, chunk by chunk (its causal convolutions and temporal upsamplings keep
    what the next chunk needs); leaving it forgets the clip."""
    layers = [m for m in module.modules() if isinstance(m, (CausalConv3d, Upsample))]
    for layer in layers:
        layer.streaming = True
    try:
        yield
    finally:
        for layer in layers:
            layer.streaming = False
            if isinstance(layer, CausalConv3d):
                layer.carry = None
            else:
                layer.past_first_chunk = False


@dataclass(frozen=True)
class SpatialTiles:
    """Square tiles of `size` latent pixels overlapping by `overlap` (size 0: no tiling)."""

    size: int
    overlap: int

    @classmethod
    def of(cls, cfg: AutoencoderConfig) -> SpatialTiles:
        size, overlap = cfg.tile_latents, cfg.tile_overlap_latents
        if size < 0 or (size and not 0 <= overlap < size):
            raise ValueError(
                f"autoencoder.tile_latents={size} must be >= 0 (0: whole frames), and "
                f"autoencoder.tile_overlap_latents={overlap} in [0, tile_latents)"
            )
        return cls(size, overlap)

    def apply(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        scale: int,
        downscales: bool,
    ) -> torch.Tensor:
        """fn(x) computed tile by tile and blended. x is pixels (`downscales`: fn maps pixels to
        latents, `scale` times smaller) or latents (fn maps them to pixels, `scale` times larger)."""
        in_scale, out_scale = (scale, 1) if downscales else (1, scale)
        size, stride = self.size * in_scale, (self.size - self.overlap) * in_scale
        height, width = x.shape[-2:]
        if not self.size or (height <= size and width <= size):
            return fn(x)
        out = weights = None
        for top in _tile_starts(height, size, stride):
            for left in _tile_starts(width, size, stride):
                tile = fn(x[..., top : top + size, left : left + size])
                if out is None:
                    rows, columns = height * out_scale // in_scale, width * out_scale // in_scale
                    out = tile.new_zeros(*tile.shape[:-2], rows, columns)
                    weights = tile.new_zeros(rows, columns)
                ramp = self.overlap * out_scale
                weight = _ramp(tile.shape[-2], ramp, top > 0, top + size < height)[:, None]
                weight = weight * _ramp(tile.shape[-1], ramp, left > 0, left + size < width)
                weight = weight.to(tile)
                row, column = top * out_scale // in_scale, left * out_scale // in_scale
                rows = slice(row, row + tile.shape[-2])
                columns = slice(column, column + tile.shape[-1])
                out[..., rows, columns] += tile * weight
                weights[rows, columns] += weight
        return out / weights


def _tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Where tiles of `size` every `stride` start along `length`, the last flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return [*starts, length - size]


def _ramp(length: int, overlap: int, rises: bool, falls: bool) -> torch.Tensor:
    """(length,) blending weights: a linear rise over the first `overlap` entries where a tile
    before overlaps this one, a fall over the last where one after does, 1 between."""
    weight = torch.ones(length)
    edge = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if overlap and rises:
        weight[:overlap] = edge
    if overlap and falls:
        weight[-overlap:] = torch.minimum(weight[-overlap:], edge.flip(0))
    return weight


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _resampling_plan(cfg: AutoencoderConfig) -> list[tuple[bool, bool]]:
    """(time, space) for each downsample, encoder order. Space is reduced first and time at the
    deepest levels, where features are cheapest and most abstract (as in Wan's VAE)."""
    for name in ("spatial_compression", "temporal_compression"):
        if not _is_power_of_two(getattr(cfg, name)):
            raise ValueError(f"autoencoder.{name} must be a power of two, got {getattr(cfg, name)}")
    spatial_steps = int(math.log2(cfg.spatial_compression))
    temporal_steps = int(math.log2(cfg.temporal_compression))
    levels = max(spatial_steps, temporal_steps)
    if len(cfg.channel_multipliers) != levels + 1:
        raise ValueError(
            f"autoencoder.channel_multipliers has {len(cfg.channel_multipliers)} entries; "
            f"compressions {cfg.spatial_compression}x (space) and {cfg.temporal_compression}x (time) "
            f"need {levels} downsamples, so {levels + 1} multipliers"
        )
    return [(i >= levels - temporal_steps, i < spatial_steps) for i in range(levels)]


class CausalVideoVAE(VideoAutoencoder):
    """Causal 3D convolutional VAE with residual blocks, strided downsampling and a diagonal
    Gaussian posterior; the decoder mirrors the encoder."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        for name in ("latent_channels", "base_channels", "num_res_blocks"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"autoencoder.{name} must be >= 1, got {getattr(cfg, name)}")
        plan = _resampling_plan(cfg)
        widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
        if cfg.chunk_latent_frames < 0:
            raise ValueError(
                f"autoencoder.chunk_latent_frames must be >= 0 (0: whole clips), "
                f"got {cfg.chunk_latent_frames}"
            )
        self.latent_channels = cfg.latent_channels
        self.spatial_compression = cfg.spatial_compression
        self.temporal_compression = cfg.temporal_compression
        self.kl_weight = cfg.kl_weight
        self.chunk_latent_frames = cfg.chunk_latent_frames
        self.tiles = SpatialTiles.of(cfg)

        encoder: list[nn.Module] = [CausalConv3d(3, widths[0])]
        width = widths[0]
        for level, level_width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                encoder.append(ResBlock(width, level_width))
                width = level_width
            if level < len(plan):
                encoder.append(Downsample(width, *plan[level]))
        encoder += self._bottleneck(width)
        encoder += [FrameGroupNorm(width), nn.SiLU(), CausalConv3d(width, 2 * cfg.latent_channels)]
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [CausalConv3d(cfg.latent_channels, width)]
        decoder += self._bottleneck(width)
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks):
                decoder.append(ResBlock(width, widths[level]))
                width = widths[level]
            if level > 0:
                decoder.append(Upsample(width, *plan[level - 1]))
        decoder += [FrameGroupNorm(width), nn.SiLU(), CausalConv3d(width, 3)]
        self.decoder = nn.Sequential(*decoder)

        self._init_normalisation(torch.zeros(cfg.latent_channels), torch.ones(cfg.latent_channels))

    @staticmethod
    def _bottleneck(width: int) -> list[nn.Module]:
        return [ResBlock(width, width), FrameAttention(width), ResBlock(width, width)]

    def _encode_raw(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = self._chunks(video.shape[2], self.temporal_compression)
        latent_frames = 1 + (video.shape[2] - 1) // self.temporal_compression

        def encode(tile: torch.Tensor) -> torch.Tensor:
            return self._in_chunks(self.encoder, tile, chunks, latent_frames)

        moments = self.tiles.apply(encode, video, self.spatial_compression, downscales=True)
        mean, logvar = moments.chunk(2, dim=1)
        # The usual clamp keeps exp(logvar) finite early in training.
        return mean, logvar.clamp(-30.0, 20.0)

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        frames = 1 + (latents.shape[2] - 1) * self.temporal_compression
        chunks = self._chunks(latents.shape[2], 1)

        def decode(tile: torch.Tensor) -> torch.Tensor:
            return self._in_chunks(self.decoder, tile, chunks, frames)

        return self.tiles.apply(decode, latents, self.spatial_compression, downscales=False)

    def _chunks(self, frames: int, per_latent_frame: int) -> list[int]:
        """The frames of each chunk of a clip of `frames` (pixels: per_latent_frame is the
        temporal compression; latents: 1): the first chunk_latent_frames latent frames hold
        frame 0 alone and then whole groups, every later chunk whole groups only."""
        if not self.chunk_latent_frames:
            return [frames]
        first = 1 + (self.chunk_latent_frames - 1) * per_latent_frame
        rest = self.chunk_latent_frames * per_latent_frame
        chunks = [min(first, frames)]
        while sum(chunks) < frames:
            chunks.append(min(rest, frames - sum(chunks)))
        return chunks

    @staticmethod
    def _in_chunks(
        part: nn.Module, x: torch.Tensor, chunks: list[int], frames_out: int
    ) -> torch.Tensor:
        """part(x), streamed over chunks of x's frames into one output of frames_out frames
        (written chunk by chunk, so no list of chunk outputs doubles it)."""
        if len(chunks) == 1:
            return part(x)
        out, start = None, 0
        with streaming(part):
            for chunk in x.split(chunks, dim=2):
                y = part(chunk)
                if out is None:
                    out = y.new_empty(*y.shape[:2], frames_out, *y.shape[3:])
                out[:, :, start : start + y.shape[2]] = y
                start += y.shape[2]
        return out

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        # The training step, as forward so DDP / FSDP wrappers see it (they hook __call__).
        return self.loss(video)

    def loss(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss on pixels (B, 3, T, H, W): L1 reconstruction of a posterior sample plus
        kl_weight * KL(posterior || N(0, I)), both averaged per element.

        L1 rather than MSE: it penalises small errors more, giving sharper reconstructions
        (MSE's optimum is the blurry average), and is the pixel term of the SD / Wan VAE losses.
        """
        self.latent_shape(tuple(video.shape))
        mean, logvar = self._encode_raw(video)
        reconstruction = self._decode_raw(_sample_gaussian(mean, logvar))
        recon = (reconstruction - video).abs().mean()
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        return {"loss": recon + self.kl_weight * kl, "recon": recon, "kl": kl}


# --------------------------------------------------------------------------------------------------
# Pretrained diffusers video VAEs
# --------------------------------------------------------------------------------------------------


def _import_diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(
            "autoencoder kind 'diffusers' needs the diffusers package: pip install 'diffusers>=0.30' "
            "(or install tessera's dev extra)"
        ) from error
    return diffusers


class DiffusersVideoAutoencoder(VideoAutoencoder):
    """Frozen adapter over a pretrained diffusers video VAE in a local folder (the VAE's own folder,
    or a pipeline folder with a `vae/` subfolder). The class comes from the folder's config
    `_class_name`, e.g. AutoencoderKLWan, AutoencoderKLHunyuanVideo or AutoencoderKLCogVideoX.

    Latents are normalised with the model's own statistics: `latents_mean` / `latents_std` and
    `scaling_factor` when its config has them (z_norm = (z - mean) * scaling_factor / std), so
    `encode` matches what the matching diffusers pipeline feeds its transformer.
    """

    def __init__(self, path: str, tiles: SpatialTiles = SpatialTiles(0, 0)) -> None:
        super().__init__()
        folder = _diffusers_vae_folder(path)
        with open(os.path.join(folder, "config.json")) as f:
            class_name = json.load(f).get("_class_name")
        diffusers = _import_diffusers()
        vae_class = getattr(diffusers, class_name or "", None)
        if vae_class is None:
            raise ValueError(
                f"{folder}/config.json names _class_name={class_name!r}, which is not a class of "
                f"diffusers {diffusers.__version__}"
            )
        self.vae = vae_class.from_pretrained(folder, local_files_only=True)
        self.vae.requires_grad_(False).eval()

        config = self.vae.config
        self.latent_channels = _first_present(config, "latent_channels", "z_dim")
        self.spatial_compression = _compression(self.vae, "spatial")
        self.temporal_compression = _compression(self.vae, "temporal")
        if self.latent_channels is None:
            raise ValueError(f"{folder}/config.json has neither latent_channels nor z_dim")

        channels = self.latent_channels
        shift = _channel_stat(self.vae, "latents_mean", channels)
        if shift is None:
            shift = torch.full((channels,), float(config.get("shift_factor") or 0.0))
        std = _channel_stat(self.vae, "latents_std", channels)
        if std is None:
            std = torch.ones(channels)
        scaling_factor = float(config.get("scaling_factor") or 1.0)
        self._init_normalisation(shift, std / scaling_factor)
        if tiles.size:
            self._enable_tiling(tiles)

    def _enable_tiling(self, tiles: SpatialTiles) -> None:
        """The VAE's own spatial tiling, at the tile size and overlap asked (in latent pixels),
        through whichever of diffusers' tiling arguments this VAE class takes."""
        if not hasattr(self.vae, "enable_tiling"):
            raise ValueError(
                f"autoencoder.tile_latents={tiles.size}: {type(self.vae).__name__} has no tiling "
                "in this diffusers version; set it to 0"
            )
        size = tiles.size * self.spatial_compression
        stride = (tiles.size - tiles.overlap) * self.spatial_compression
        offered = {
            "tile_sample_min_height": size,
            "tile_sample_min_width": size,
            "tile_sample_stride_height": stride,
            "tile_sample_stride_width": stride,
            "tile_overlap_factor_height": tiles.overlap / tiles.size,
            "tile_overlap_factor_width": tiles.overlap / tiles.size,
        }
        accepted = inspect.signature(self.vae.enable_tiling).parameters
        self.vae.enable_tiling(**{k: v for k, v in offered.items() if k in accepted})

    def train(self, mode: bool = True) -> DiffusersVideoAutoencoder:
        # Pretrained and frozen: stay in eval mode even inside a module switched to train().
        return super().train(False)

    def _encode_raw(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        return posterior.mean.to(video.dtype), posterior.logvar.to(video.dtype)

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames 1 + temporal x (latent frames - 1), as encoding maps them. CogVideoX's VAE
        decodes an even number of latent frames to temporal x as many (its 1.5 pipeline pads the
        start to make them even, then drops it): the extra first frames go."""
        video = self.vae.decode(latents.to(self.vae.dtype)).sample.to(latents.dtype)
        frames = 1 + self.temporal_compression * (latents.shape[2] - 1)
        return video[:, :, -frames:]


def _diffusers_vae_folder(path: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"diffusers autoencoder folder not found: {path}")
    for folder in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise FileNotFoundError(
        f"no config.json in diffusers autoencoder folder {path} (nor in {path}/vae)"
    )


def _first_present(config, *keys: str):
    return next((config[k] for k in keys if config.get(k) is not None), None)


def _compression(vae: nn.Module, axis: str) -> int:
    """Compression factor from the model attribute or its config; diffusers classes disagree on
    names (HunyuanVideo: temporal_compression_ratio, Wan: scale_factor_temporal, ...)."""
    # An attribute the VAE computes itself (LTX-Video), else its config; diffusers warns when a
    # config value is read as an attribute.
    value = vars(vae).get(f"{axis}_compression_ratio")
    if value is None:
        value = _first_present(vae.config, f"{axis}_compression_ratio", f"scale_factor_{axis}")
    if value is None and axis == "spatial" and "block_out_channels" in vae.config:
        value = 2 ** (len(vae.config["block_out_channels"]) - 1)  # CogVideoX
    if value is None:
        raise ValueError(
            f"cannot tell the {axis} compression of {type(vae).__name__} from its config"
        )
    return int(value)


def _channel_stat(vae: nn.Module, name: str, channels: int) -> torch.Tensor | None:
    # A config list for Wan / CogVideoX, a buffer for LTX.
    value = vae.config.get(name)
    if value is None:
        value = dict(vae.named_buffers(recurse=False)).get(name)
    if value is None:
        return None
    stat = torch.as_tensor(value, dtype=torch.float32).flatten()
    if stat.numel() != channels:
        raise ValueError(f"{name} has {stat.numel()} entries but the VAE has {channels} channels")
    return stat


# --------------------------------------------------------------------------------------------------


def build_autoencoder(cfg: AutoencoderConfig) -> VideoAutoencoder:
    """Our CausalVideoVAE (with cfg.checkpoint's weights if set), or the diffusers adapter."""
    if cfg.kind == "diffusers":
        if not cfg.pretrained_path:
            raise ValueError(
                "autoencoder.kind is 'diffusers' but autoencoder.pretrained_path is not set"
            )
        return DiffusersVideoAutoencoder(cfg.pretrained_path, SpatialTiles.of(cfg))
    if cfg.kind != "causal_vae":
        raise ValueError(
            f"unknown autoencoder.kind {cfg.kind!r}; expected 'causal_vae' or 'diffusers'"
        )
    model = CausalVideoVAE(cfg)
    if cfg.checkpoint:
        _load_checkpoint(model, cfg.checkpoint)
    return model


def weight_files(cfg: AutoencoderConfig) -> list[str]:
    """The files that decide what the autoencoder computes (for the record of latent shards);
    [] for a randomly initialised causal VAE."""
    if cfg.kind == "diffusers" and cfg.pretrained_path:
        folder = _diffusers_vae_folder(cfg.pretrained_path)
        return sorted(
            os.path.join(folder, name)
            for name in os.listdir(folder)
            if name == "config.json" or name.endswith((".safetensors", ".bin"))
        )
    return [cfg.checkpoint] if cfg.checkpoint else []


def _load_checkpoint(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"autoencoder checkpoint not found: {path}")
    try:
        state_dict = safetensors.torch.load_file(path)
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(
            f"autoencoder checkpoint {path} is not a readable safetensors file: {error}"
        ) from error
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"autoencoder checkpoint {path} does not match the autoencoder config: {error}"
        ) from error

"""Generate videos and images from a trained DiT: the sampling command and training-time samples.

    python -m train.sample checkpoint=runs/demo mode=t2v prompt="a rabbit in a meadow" \\
        frames=17 height=64 width=96 seed=0 out=rabbit.mp4

Modes (`mode=`):
    t2v      text to video: one window of `frames` frames, or `seconds` of video (longer ones
             are made by repeated forward extension, up to 60 s)
    t2i      text to image: one frame
    i2v      `image=` animated: the image is the first frame, given
    extend   `video=` continued by `seconds`, `direction=forward` or `backward`
    connect  `video=` joined to `video2=` by `seconds` of transition
    edit     `video=` re-made from `prompt` (SDEdit): noised to `strength`, then denoised

One window can be one long sequence spread over ranks: under torchrun, `parallel.cp=N` (ring
attention) and/or `parallel.sp=M` (Ulysses), with N x M the world size, split the window's
tokens as training does; every rank runs the same sampler with the same seed and rank 0 writes:

    torchrun --nproc_per_node 2 -m train.sample checkpoint=runs/demo parallel.cp=2 frames=481

A window is `frames` frames; given latent frames (the image, or the `context` latent frames next to
the new ones) are put back at every sampling step, so they come out unchanged up to the
autoencoder's round trip. Every mp4 carries a provenance record (model, checkpoint, weights,
prompt, mode, inputs) as JSON in its comment. `checkpoint` is a run directory (its export/ when that
holds the `weights` asked, else its latest checkpoint), an export/ folder, or one checkpoint folder
of any engine (train/checkpoint.py reads each); the run's own config rebuilds the model.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from data.decode import read_media
from data.mp4 import write_mp4
from model.flow import FlowConfig, euler_sample
from model.geometry import LatentGeometry
from model.pretrained import PretrainedVideoModel, channel_condition
from train.build import build_dit, config_from_dict, frozen, load_trained, model_name
from train.checkpoint import WEIGHTS, CheckpointError, find_weights, read_weights
from train.config import Config, ParallelConfig
from train.encoders import FrozenEncoders
from train.parallel import ParallelDims
from train.parallel.parallelize import split_sequences
from train.runtime import Runtime, end_finished_rank, init_runtime, launch_env, shutdown

MAX_SECONDS = 60.0  # the longest video the command makes, as Sora
MODES = ("t2v", "t2i", "i2v", "extend", "connect", "edit")
GIVEN_FRAME_MODES = ("i2v", "extend", "connect")  # modes whose given frames stay clean


@dataclass
class VideoGenerator:
    """A trained DiT with its autoencoder and text encoder, and how to sample with them.

    Videos in and out are uint8 (frames, height, width, 3). A window of T latent frames is
    1 + c(T-1) pixel frames (model/geometry.py), c the autoencoder's temporal compression.
    """

    dit: torch.nn.Module
    autoencoder: torch.nn.Module
    text_encoder: torch.nn.Module
    flow: FlowConfig
    fps: float
    steps: int | None = None  # None: flow.sample_steps
    cfg_scale: float | None = None  # None: flow.cfg_scale
    seed: int = 0
    context: int = 2  # latent frames given at each end a window continues
    native_size: tuple[int, int] | None = None  # micro-condition; None: the output size
    autocast: object = nullcontext

    def __post_init__(self):
        self.device = next(self.dit.parameters()).device
        self.generator = torch.Generator().manual_seed(self.seed)
        self.geometry = LatentGeometry.of(self.autoencoder, self.dit.cfg.patch_size)
        self.captions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # windows share them
        # Shown its given frames as input channels (Wan 2.2 I2V), rather than keeping them clean.
        family = getattr(self.dit, "family", None)
        self.given_as_channels = family is not None and family.given == "channels"

    def caption(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self.captions:
            self.captions[prompt] = self.text_encoder.encode([prompt])
        return self.captions[prompt]

    # --- latents in and out ---------------------------------------------------------------

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        video = torch.tensor(frames, device=self.device).permute(3, 0, 1, 2)[None]
        return self.autoencoder.encode(video.float() / 127.5 - 1.0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        with self.autocast():
            video = self.autoencoder.decode(latents.float())
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return video[0].permute(1, 2, 3, 0).cpu().numpy()

    def roundtrip(self, frames: np.ndarray) -> np.ndarray:
        """What the autoencoder makes of frames: the best a given frame can come out as."""
        return self.decode(self.encode(frames))

    @torch.no_grad()
    def shown_frames(
        self, frames: int, first: np.ndarray, last: np.ndarray | None = None
    ) -> torch.Tensor:
        """The input channels that show a model its given frames: a window of `frames` pixel
        frames, zero but for the first image and (connect) the last (model/pretrained.py)."""
        height, width = first.shape[:2]
        video = torch.zeros(1, 3, frames, height, width, device=self.device)
        shown = torch.zeros(1, frames, dtype=torch.bool, device=self.device)
        for index, image in ((0, first), (frames - 1, last)):
            if image is not None:
                pixels = torch.tensor(image, device=self.device).permute(2, 0, 1)
                video[0, :, index], shown[0, index] = pixels.float() / 127.5 - 1.0, True
        latents = self.autoencoder.encode(video)
        return channel_condition(latents, shown, self.geometry.temporal_compression)

    def front_context(self, video: np.ndarray, k: int) -> tuple[torch.Tensor, int]:
        """The last frames of a video as k latent frames that start a window: (latents,
        how many pixel frames they stand for)."""
        count = self.geometry.pixel_frames(k)
        _check_length(video, count, "continue it from its end")
        return self.encode(video[len(video) - count :]), count

    def back_context(self, video: np.ndarray, k: int) -> tuple[torch.Tensor, int]:
        """The first tc*k frames of a video as k latent frames that end a window. Their first
        frame is repeated in front, so that latent frames 1..k cover exactly those frames, as the
        later latent frames of a window do."""
        count = self.geometry.temporal_compression * k
        _check_length(video, count, "continue it from its start")
        return self.encode(np.concatenate([video[:1], video[:count]]))[:, :, 1:], count

    # --- one window ---------------------------------------------------------------------------

    @torch.no_grad()
    def window(
        self,
        prompt: str,
        frames: int,
        height: int,
        width: int,
        given: dict[int, torch.Tensor] | None = None,
        reference: torch.Tensor | None = None,
        strength: float = 1.0,
        condition: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Sample one window of `frames` frames and decode it. given: latent frame index -> its
        clean latents (C, H, W), kept as they are; reference: latents of the whole window to
        start from at `strength` (SDEdit); condition: the frames shown as input channels
        (`shown_frames`)."""
        lt, lh, lw = self.latent_shape(frames, height, width)
        shape = (1, self.autoencoder.latent_channels, lt, lh, lw)
        noise = torch.randn(shape, generator=self.generator).to(self.device)
        clean = reference.clone() if reference is not None else torch.zeros_like(noise)
        given_mask = None
        if given:
            given_mask = torch.zeros(1, lt, dtype=torch.bool, device=self.device)
            for index, latents in given.items():
                clean[0, :, index], given_mask[0, index] = latents, True
        text, mask = self.caption(prompt)
        null_text, null_mask = self.text_encoder.null_embedding()
        native = self.native_size or (height, width)
        micro = {
            "fps": torch.tensor([self.fps], device=self.device),
            "native_size": torch.tensor([native], dtype=torch.float32, device=self.device),
        }
        if condition is not None:
            micro["condition"] = condition
        with self.autocast():
            latents = euler_sample(
                self.dit,
                noise,
                text,
                mask,
                null_text,
                null_mask,
                self.flow,
                steps=self.steps,
                cfg_scale=self.cfg_scale,
                num_tokens=self.geometry.latent_tokens((lt, lh, lw)),
                clean=clean,
                given=given_mask,
                strength=strength,
                model_kwargs=micro,
            )
        return self.decode(latents)

    # --- the modes ------------------------------------------------------------------------------

    def text_to_video(self, prompt: str, frames: int, height: int, width: int, seconds=None):
        """One window, or `seconds` of video by extending the first window forwards."""
        video = self.window(prompt, frames, height, width)
        if seconds is None or len(video) >= self.frame_count(seconds):
            return video
        return self.extend(prompt, video, seconds - len(video) / self.fps, frames, "forward")

    def image_to_video(self, prompt: str, image: np.ndarray, frames: int) -> np.ndarray:
        """A window whose first frame is the image (its first latent frame, given)."""
        height, width = image.shape[1:3]
        if self.given_as_channels:
            condition = self.shown_frames(frames, image[0])
            return self.window(prompt, frames, height, width, condition=condition)
        first = self.encode(image[:1])[0, :, 0]
        return self.window(prompt, frames, height, width, given={0: first})

    def extend(
        self, prompt: str, video: np.ndarray, seconds: float, frames: int, direction: str
    ) -> np.ndarray:
        """The video with `seconds` more before (backward) or after (forward) it, window by
        window; each window's given frames replace the frames they were encoded from."""
        wanted = len(video) + self.frame_count(seconds)
        height, width = video.shape[1:3]
        window_latents = self.latent_shape(frames, height, width)[0]
        k = min(self.context, window_latents - 1)
        if k < 1:
            raise ValueError(f"frames={frames}: a window must have room for a new latent frame")
        while len(video) < wanted:
            if direction == "forward":
                latents, count = self.front_context(video, k)
                window = self.window(
                    prompt, frames, height, width, given={i: latents[0, :, i] for i in range(k)}
                )
                video = np.concatenate([video[: len(video) - count], window])
            else:
                latents, count = self.back_context(video, k)
                first = window_latents - k
                given = {first + i: latents[0, :, i] for i in range(k)}
                window = self.window(prompt, frames, height, width, given=given)
                video = np.concatenate([window, video[count:]])
        return video[:wanted] if direction == "forward" else video[len(video) - wanted :]

    def connect(
        self, prompt: str, first: np.ndarray, second: np.ndarray, seconds: float
    ) -> np.ndarray:
        """first, then `seconds` of transition, then second: one window whose first k latent
        frames are first's end and whose last k are second's start. A model shown its given
        frames as channels is shown first's last frame and second's first, as the window's ends."""
        if self.given_as_channels:
            return self.connect_ends(prompt, first, second, seconds)
        k = self.context
        head, head_count = self.front_context(first, k)
        tail, tail_count = self.back_context(second, k)
        tc = self.geometry.temporal_compression
        new_latents = max(1, math.ceil(self.frame_count(seconds) / tc))
        window_latents = 2 * k + new_latents
        given = {i: head[0, :, i] for i in range(k)}
        given |= {k + new_latents + i: tail[0, :, i] for i in range(k)}
        height, width = first.shape[1:3]
        frames = self.geometry.pixel_frames(window_latents)
        window = self.window(prompt, frames, height, width, given=given)
        return np.concatenate([first[: len(first) - head_count], window, second[tail_count:]])

    def connect_ends(
        self, prompt: str, first: np.ndarray, second: np.ndarray, seconds: float
    ) -> np.ndarray:
        """connect for a model shown its given frames as channels: a window of 1 + tc n frames
        (n new latent frames for `seconds`) between first's last frame and second's first."""
        tc = self.geometry.temporal_compression
        new_latents = max(1, math.ceil(self.frame_count(seconds) / tc))
        frames = self.geometry.pixel_frames(new_latents + 1)
        condition = self.shown_frames(frames, first[-1], second[0])
        window = self.window(prompt, frames, *first.shape[1:3], condition=condition)
        return np.concatenate([first[:-1], window, second[1:]])

    def edit(self, prompt: str, video: np.ndarray, strength: float) -> np.ndarray:
        """SDEdit: the video's latents noised to `strength` and denoised with the new prompt.
        The video is cut to the longest length the autoencoder and patch take."""
        patch_t = self.geometry.patch[0]
        latent_frames = self.geometry.latent_frames(len(video))
        latent_frames -= latent_frames % patch_t
        _check_length(video, self.geometry.pixel_frames(patch_t), "edit it")
        video = video[: self.geometry.pixel_frames(latent_frames)]
        height, width = video.shape[1:3]
        return self.window(
            prompt, len(video), height, width, reference=self.encode(video), strength=strength
        )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (T, H, W) of a window, with an error naming the size when it does not fit."""
        try:
            return self.geometry.latent_shape(frames, height, width)
        except ValueError as error:
            raise ValueError(f"frames={frames}, height={height}, width={width}: {error}") from None

    def frame_count(self, seconds: float) -> int:
        return round(seconds * self.fps)


def training_samples(
    generator: VideoGenerator,
    modes: list[str],
    prompts: list[str],
    frames: int,
    height: int,
    width: int,
    strength: float = 0.6,
) -> dict[str, tuple[str, str, np.ndarray]]:
    """Samples for training-time logging: name -> (mode, prompt, frames). t2v for every prompt;
    the other modes for the first prompt only, to keep sampling cheap. Modes that need an input
    start from the t2v samples: the first prompt's for i2v and extend, and the last prompt's for
    connect (from the first's) and edit (re-made with the first prompt)."""
    t2v = [generator.window(prompt, frames, height, width) for prompt in prompts]
    samples = {}
    for mode in modes:
        if mode == "t2v":
            samples |= {f"t2v_prompt_{i}": ("t2v", prompts[i], t2v[i]) for i in range(len(t2v))}
        else:
            video = _from_t2v(generator, mode, prompts[0], t2v[0], t2v[-1], frames, strength)
            samples[f"{mode}_prompt_0"] = (mode, prompts[0], video)
    return samples


def _from_t2v(
    generator: VideoGenerator,
    mode: str,
    prompt: str,
    own: np.ndarray,
    other: np.ndarray,
    frames: int,
    strength: float,
) -> np.ndarray:
    # extend and connect add what one window adds to a video: its latent frames not given.
    geometry = generator.geometry
    new_latents = max(1, geometry.latent_frames(frames) - generator.context)
    seconds = geometry.temporal_compression * new_latents / generator.fps
    if mode == "t2i":
        return generator.window(prompt, 1, *own.shape[1:3])
    if mode == "i2v":
        return generator.image_to_video(prompt, own[:1], frames)
    if mode == "extend":
        return generator.extend(prompt, own, seconds, frames, "forward")
    if mode == "connect":
        return generator.connect(prompt, own, other, seconds)
    if mode == "edit":
        return generator.edit(prompt, other, strength)
    raise ValueError(f"unknown sample mode {mode!r}; known modes: {', '.join(MODES)}")


def _check_length(video: np.ndarray, needed: int, purpose: str) -> None:
    if len(video) < needed:
        raise ValueError(f"the input video has {len(video)} frames; {purpose} needs {needed}")


# --- the command ---------------------------------------------------------------------------------


@dataclass
class SampleParallelConfig:
    """How one window's tokens split over the ranks torchrun starts; cp x sp is the world size."""

    cp: int = 1  # ring attention
    sp: int = 1  # Ulysses; must divide the heads


@dataclass
class SampleConfig:
    checkpoint: str = "runs/demo"
    mode: str = "t2v"  # t2v | t2i | i2v | extend | connect | edit
    prompt: str = "a big white cartoon rabbit in a green meadow"
    frames: int = 17  # frames of one window (t2v, i2v, extend)
    seconds: float | None = None  # t2v: total length; extend, connect: new video to make
    height: int = 64
    width: int = 64
    fps: float = 8.0  # frame rate asked of the model (a micro-condition) and of the mp4
    native_height: int | None = None  # native-resolution micro-condition; None: height
    native_width: int | None = None  # ... None: width
    image: str | None = None  # i2v: the first frame
    video: str | None = None  # extend, edit: the video; connect: the first video
    video2: str | None = None  # connect: the second video
    direction: str = "forward"  # extend: forward | backward
    strength: float = 0.6  # edit: how far the video is noised (1 = pure noise, 0 = unchanged)
    context: int = 2  # latent frames a continuing window is given at each end
    steps: int | None = None  # None: the run's flow.sample_steps
    cfg_scale: float | None = None  # None: the run's flow.cfg_scale
    seed: int = 0
    # ema | raw: a run directory gives its export when that holds them, else its latest
    # checkpoint; a run that kept no EMA gives its raw weights
    weights: str = "ema"
    device: str = "auto"
    out: str = "sample.mp4"
    parallel: SampleParallelConfig = field(default_factory=SampleParallelConfig)


def run_mode(generator: VideoGenerator, cfg: SampleConfig) -> tuple[np.ndarray, dict]:
    """The frames a mode makes, and the inputs it used (for the provenance record)."""
    size = (cfg.height, cfg.width)
    needs = {
        "i2v": ["image"],
        "extend": ["video"],
        "edit": ["video"],
        "connect": ["video", "video2"],
    }
    for key in needs.get(cfg.mode, []):
        if getattr(cfg, key) is None:
            raise ValueError(f"mode={cfg.mode} needs {key}=PATH")
    if cfg.mode in ("extend", "connect") and cfg.seconds is None:
        raise ValueError(f"mode={cfg.mode} needs seconds=... (how much new video to make)")
    read = {key: read_media(getattr(cfg, key), size, cfg.fps) for key in needs.get(cfg.mode, [])}
    if cfg.mode == "t2v":
        video = generator.text_to_video(cfg.prompt, cfg.frames, *size, seconds=cfg.seconds)
    elif cfg.mode == "t2i":
        video = generator.window(cfg.prompt, 1, *size)
    elif cfg.mode == "i2v":
        video = generator.image_to_video(cfg.prompt, read["image"], cfg.frames)
    elif cfg.mode == "extend":
        video = generator.extend(cfg.prompt, read["video"], cfg.seconds, cfg.frames, cfg.direction)
    elif cfg.mode == "connect":
        video = generator.connect(cfg.prompt, read["video"], read["video2"], cfg.seconds)
    else:
        video = generator.edit(cfg.prompt, read["video"], cfg.strength)
    return video, {key: str(getattr(cfg, key)) for key in read}


def check_sample_config(cfg: SampleConfig) -> None:
    choices = {"mode": MODES, "direction": ("forward", "backward"), "weights": WEIGHTS}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    if cfg.fps <= 0:
        raise ValueError(f"fps={cfg.fps}: must be > 0")
    if cfg.seconds is not None and not 0 < cfg.seconds <= MAX_SECONDS:
        raise ValueError(f"seconds={cfg.seconds}: must be in (0, {MAX_SECONDS:g}]")
    if not 0 < cfg.strength <= 1:
        raise ValueError(f"strength={cfg.strength}: must be in (0, 1]")
    if cfg.context < 1:
        raise ValueError(f"context={cfg.context}: must be at least 1 latent frame")


@dataclass
class SamplingParts:
    config: Config  # the run's
    dit: torch.nn.Module  # Tessera's DiT or a pretrained model, with the trained weights
    autoencoder: torch.nn.Module
    text_encoder: torch.nn.Module
    source: Path  # the export or checkpoint folder the weights came from
    weights: str  # "ema" | "raw"


def load_for_sampling(checkpoint: str, weights: str, device: torch.device) -> SamplingParts:
    """The trained model of a run directory, export or checkpoint folder of any engine
    (train/checkpoint.py finds and consolidates its weights), with the run's encoders."""
    saved = find_weights(checkpoint, weights)
    config = config_from_dict(saved.config)
    encoders = FrozenEncoders(config, device)
    dit = build_dit(config, encoders.autoencoder.latent_channels, encoders.text_encoder.dim)
    try:
        load_trained(dit, read_weights(saved, dit), saved.folder)
    except ValueError as error:
        raise CheckpointError(str(error)) from error
    return SamplingParts(
        config,
        frozen(dit, device),
        encoders.autoencoder,
        encoders.text_encoder,
        saved.folder,
        saved.kind,
    )


def load(cfg: SampleConfig) -> SamplingParts:
    """The checkpoint's model, on the device `cfg` asks for."""
    check_sample_config(cfg)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if cfg.device == "auto"
        else cfg.device
    )
    return load_for_sampling(cfg.checkpoint, cfg.weights, device)


def check_model_mode(dit: torch.nn.Module, mode: str) -> None:
    """A pretrained family with one time per sample cannot keep given frames clean; one shown
    them as channels takes a first image (i2v), or a first and a last (connect), only."""
    family = dit.family if isinstance(dit, PretrainedVideoModel) else None
    if family is None:
        return
    if family.given == "channels":
        if mode not in ("i2v", "connect"):
            raise ValueError(
                f"mode={mode}: model.pretrained.family={family.name} makes a video from a first "
                "image (mode=i2v) or between a first and a last (mode=connect), nothing else"
            )
        return
    if family.time == "sample" and mode in GIVEN_FRAME_MODES:
        raise ValueError(
            f"mode={mode} keeps given frames clean, which model.pretrained.family={family.name} "
            "cannot (one time per sample): use t2v, t2i or edit"
        )


def sample_to_mp4(parts: SamplingParts, cfg: SampleConfig, write: bool = True) -> Path:
    """Run `cfg.mode` and write the mp4 with its provenance record (`write`: this rank does)."""
    check_sample_config(cfg)
    check_model_mode(parts.dit, cfg.mode)
    generator = VideoGenerator(
        parts.dit,
        parts.autoencoder,
        parts.text_encoder,
        parts.config.flow,
        cfg.fps,
        cfg.steps,
        cfg.cfg_scale,
        cfg.seed,
        cfg.context,
        (cfg.native_height or cfg.height, cfg.native_width or cfg.width),
    )
    video, inputs = run_mode(generator, cfg)
    span = (len(video) - 1) / cfg.fps  # first frame to last: a causal minute is 60 fps + 1 frames
    if span > MAX_SECONDS:
        raise ValueError(f"the result would span {span:.1f} s > {MAX_SECONDS:g} s")
    provenance = {
        "generator": "tessera",
        "model": model_name(parts.config),
        "checkpoint": str(parts.source),
        "weights": parts.weights,
        "mode": cfg.mode,
        "prompt": cfg.prompt,
        "inputs": inputs,
        "seed": cfg.seed,
        "steps": cfg.steps or parts.config.flow.sample_steps,
        "cfg_scale": parts.config.flow.cfg_scale if cfg.cfg_scale is None else cfg.cfg_scale,
        "fps": cfg.fps,
        **({"strength": cfg.strength} if cfg.mode == "edit" else {}),
        **({"parallel": vars(cfg.parallel)} if cfg.parallel != SampleParallelConfig() else {}),
    }
    if not write:
        return Path(cfg.out)
    path = write_mp4(cfg.out, video, cfg.fps, provenance)
    print(
        f"wrote {path} ({cfg.mode}: {video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, "
        f"{cfg.fps:g} fps) from the {parts.weights} weights of {parts.source}"
    )
    return path


def parse(argv: list[str]) -> SampleConfig:
    cli = OmegaConf.from_cli(argv)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SampleConfig), cli))


def load_over_ranks(cfg: SampleConfig) -> tuple[SamplingParts, Runtime]:
    """The checkpoint's model on this rank of the torchrun world, its windows' tokens split over
    the world as cfg.parallel says (cp x sp ranks)."""
    check_sample_config(cfg)
    rank, world_size, _ = launch_env()
    layout = ParallelConfig(backend="ddp", dp_shard=1, cp=cfg.parallel.cp, sp=cfg.parallel.sp)
    dims = ParallelDims.resolve(layout, world_size, rank)
    runtime = init_runtime(cfg.device, distributed=True)
    try:
        parts = load_for_sampling(cfg.checkpoint, cfg.weights, runtime.device)
        dims.check_model(parts.config.model.num_heads)
        dims.build_mesh(runtime.device.type)
        split_sequences(parts.dit, dims)
    except BaseException:
        shutdown()
        raise
    return parts, runtime


def sample_over_ranks(cfg: SampleConfig) -> Path:
    """`sample_to_mp4` with every window one sequence over the torchrun world; rank 0 writes."""
    parts, runtime = load_over_ranks(cfg)
    try:
        path = sample_to_mp4(parts, cfg, write=runtime.is_main)
    except BaseException:
        shutdown()
        raise
    shutdown(finished=True)
    return path


def main(argv: list[str]) -> Path:
    cfg = parse(argv)
    if cfg.parallel == SampleParallelConfig() and launch_env()[1] == 1:
        return sample_to_mp4(load(cfg), cfg)
    return sample_over_ranks(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
    end_finished_rank()

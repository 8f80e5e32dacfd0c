"""Video quality metrics a text-to-video run reports: FVD and CLIP score.

FVD (Unterthiner et al., 2018) is the Fréchet distance between Gaussians fitted to the features a
video network gives real and generated clips. Two networks are supported, both loaded from local
files, since an evaluation must not depend on a download:

- I3D, the Kinetics-400 classifier of the original FVD, as the TorchScript file StyleGAN-V
  publishes (`i3d_torchscript.pt`); the features are its 400 logits before the softmax.
- VideoMAE, a self-supervised video transformer (a `transformers` folder): content-debiased FVD
  (Ge et al., CVPR 2024) finds I3D features reward per-frame quality over motion, VideoMAE's much
  less so. The features are the mean of its last hidden states.

CLIP score measures text-video alignment: each frame's CLIP image embedding against its prompt's.

Pixels come in Tessera's convention, (N, 3, T, H, W) floats in [-1, 1]; they are clamped there
first, as decoded videos are not. FVD values compare only across the same network (`fingerprint`),
clip length and number of clips: the estimate is biased upwards, the more so the fewer the clips.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoTokenizer, CLIPModel, VideoMAEModel
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

I3D_SIZE = 224  # the frame size I3D was trained and evaluated at
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json stores them


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two (N, D)
    feature sets, in float64 with unbiased covariances (np.cov, as pytorch-fid).

    (S1 S2)^(1/2) comes from scipy.linalg.sqrtm; for nearly singular covariances it carries tiny
    imaginary parts from rounding, which FID and FVD implementations drop, and so do we."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(
            f"expected two (N, D) feature sets, got {real.shape} and {generated.shape}"
        )
    s1 = np.atleast_2d(np.cov(real, rowvar=False))
    s2 = np.atleast_2d(np.cov(generated, rowvar=False))
    root = np.real(scipy.linalg.sqrtm(s1 @ s2))
    mean_term = np.sum((real.mean(0) - generated.mean(0)) ** 2)
    return float(mean_term + np.trace(s1 + s2 - 2 * root))


@dataclass(frozen=True)
class FramePrep:
    """How a network wants its frames: the shorter side resized to `short`, a centre crop of
    `crop` (what the Hugging Face image processors do, here in torch on the network's device),
    then [0, 1] pixels normalised by `mean` and `std`."""

    short: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "bilinear"

    @classmethod
    def from_folder(
        cls, folder: Path, crop: int, mean: list[float], std: list[float], mode: str
    ) -> FramePrep:
        """The folder's preprocessor_config.json where there is one, else a resize to `crop` and
        the given mean and std. A {height, width} size resizes the shorter side to its height."""
        file = folder / "preprocessor_config.json"
        cfg = json.loads(file.read_text()) if file.exists() else {}
        size = cfg.get("size", crop)
        short = size if isinstance(size, int) else size.get("shortest_edge", size.get("height"))
        mode = RESAMPLE.get(cfg.get("resample"), mode)
        return cls(
            short, crop, tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std)), mode
        )

    def __call__(self, frames: Tensor) -> Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, 3, crop, crop) network input."""
        x = (frames.float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        scale = self.short / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        if size != (h, w):  # antialiased when shrinking and clamped, like PIL on 8-bit frames
            x = F.interpolate(
                x, size=size, mode=self.mode, antialias=scale < 1, align_corners=False
            )
            x = x.clamp(0, 1)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop]
        return (x - x.new_tensor(self.mean)[:, None, None]) / x.new_tensor(self.std)[:, None, None]


def frames_of(videos: Tensor) -> Tensor:
    """(N, 3, T, H, W) -> (N * T, 3, H, W), frame-major within each clip."""
    return videos.transpose(1, 2).flatten(0, 1)


def model_type(path: Path) -> str | None:
    """The model_type of a `transformers` folder, None for anything else."""
    config = path / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def fingerprint(path: Path) -> str:
    """sha256 of a file (what `sha256sum` prints), or over a folder's files, names and bytes in
    sorted order, leaving out hidden ones such as the hub's download metadata: a record names
    the exact network it was computed with."""
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in files if not any(s.startswith(".") for s in p.relative_to(path).parts)]
    digest = hashlib.sha256()
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class VideoFeatures:
    """The FVD feature network: I3D from a TorchScript file, or VideoMAE from a folder."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        self.path, self.device = Path(path), torch.device(device)
        expected = (
            "an I3D TorchScript file or a VideoMAE folder (config.json of model_type videomae)"
        )
        if self.path.is_file():
            try:
                self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
            except RuntimeError as error:
                raise ValueError(f"{self.path} is not TorchScript: expected {expected}") from error
            self.kind = "i3d"
            # [0, 1] -> [-1, 1], what the detector takes with rescale=False
            self.prep = FramePrep(I3D_SIZE, I3D_SIZE, (0.5,) * 3, (0.5,) * 3)
        elif model_type(self.path) == "videomae":
            self.net = VideoMAEModel.from_pretrained(self.path).to(self.device).eval()
            self.kind = "videomae"
            size = self.net.config.image_size
            self.prep = FramePrep.from_folder(
                self.path, size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bilinear"
            )
        else:
            raise ValueError(f"{self.path}: expected {expected}")

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        """(N, 3, T, H, W) pixels in [-1, 1] -> (N, D) float64 features on the CPU.

        I3D takes the clip's frames as they are (FVD is usually reported on 16-frame clips),
        resized to 224x224 here and called with rescale=False, resize=False on floats in
        [-1, 1], as common_metrics_on_video_quality calls it (StyleGAN-V passes uint8 with both
        True, which only quantises and resizes inside the network).
        VideoMAE's position embeddings fix its clip length: config.num_frames frames are picked
        evenly from longer clips, and shorter ones are padded with their last frame."""
        n, _, t = videos.shape[:3]
        if self.kind == "videomae":
            want = self.net.config.num_frames
            pick = torch.linspace(0, t - 1, want).round() if t >= want else torch.arange(want)
            videos, t = videos[:, :, pick.long().clamp(max=t - 1)], want
        x = self.prep(frames_of(videos.to(self.device))).unflatten(0, (n, t))  # (N, T, 3, S, S)
        if self.kind == "i3d":
            x = x.transpose(1, 2).contiguous()
            out = self.net(x, rescale=False, resize=False, return_features=True)
        else:
            out = self.net(pixel_values=x).last_hidden_state.mean(1)
        return out.double().cpu()

    def fingerprint(self) -> str:
        return fingerprint(self.path)


class ClipScorer:
    """Text-video alignment from a local CLIP folder (CLIPModel, its tokenizer and image processor
    config)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        self.path, self.device = Path(path), torch.device(device)
        if model_type(self.path) != "clip":
            raise ValueError(
                f"{self.path}: expected a CLIP folder (config.json of model_type clip)"
            )
        self.model = CLIPModel.from_pretrained(self.path).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        size = self.model.config.vision_config.image_size
        self.prep = FramePrep.from_folder(
            self.path, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic"
        )

    @torch.no_grad()
    def __call__(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """(N, 3, T, H, W) pixels in [-1, 1] and N prompts -> (N,) scores: the cosine similarity
        of each frame's image embedding with its prompt's text embedding, averaged over frames.

        Plain cosine, in [-1, 1]: not the 100x scaled, clamped-at-0 CLIPScore of Hessel et al.,
        so that small differences between runs stay visible."""
        n, _, t = videos.shape[:3]
        if len(prompts) != n:
            raise ValueError(f"{n} videos but {len(prompts)} prompts")
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt"
        ).to(self.device)
        text = self.model.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        text = self.model.text_projection(text.pooler_output)
        pixels = self.prep(frames_of(videos.to(self.device)))
        image = self.model.visual_projection(
            self.model.vision_model(pixel_values=pixels).pooler_output
        )
        cosine = F.cosine_similarity(image.unflatten(0, (n, t)), text[:, None], dim=-1)
        return cosine.mean(1).float().cpu()

    def fingerprint(self) -> str:
        return fingerprint(self.path)


def fvd(features: VideoFeatures, real: Tensor, generated: Tensor, batch: int = 8) -> float:
    """FVD between two sets of clips (N, 3, T, H, W) in [-1, 1], `batch` clips at a time
    through the network (the features of all clips are small; the activations are not)."""

    def embed(videos: Tensor) -> np.ndarray:
        return torch.cat(
            [features(videos[i : i + batch]) for i in range(0, len(videos), batch)]
        ).numpy()

    return frechet_distance(embed(real), embed(generated))

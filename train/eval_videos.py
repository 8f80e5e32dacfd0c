"""Evaluation videos: what the model generates for a fixed set of prompts, scored as users score
video models: FVD against the held-out clips, CLIP score against the prompts (train/quality.py).

Video i is generated from prompt i (the held-out captions in the evaluation set's order, or the
lines of eval.prompts) with noise seeded by (eval.seed, i), at eval.video_shape, so the set
does not depend on the number of ranks. Data-parallel rank r generates videos r, r + world, ...;
a rank with one video fewer generates an uncounted one more, so that every rank runs as many
forwards (under FSDP a forward is collective). The real clips' features are taken once, each
rank its own share of the held-out batches. Features, scores and a few frames of every video
are gathered by index on every rank, so every rank computes the same numbers.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn

from model.flow import FlowConfig
from train.config import EvalConfig
from train.parallel import ParallelDims
from train.quality import ClipScorer, VideoFeatures, frechet_distance
from train.runtime import Runtime
from train.sample import VideoGenerator

GRID_FRAMES = 4  # frames of each video in the grid image, evenly spaced
GRID_VIDEOS = 8  # rows of the grid image at most
FEATURE_BATCH = 8  # held-out clips through the FVD network at a time


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of `path` (eval.prompts)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ValueError(f"eval.prompts={path!r}: cannot read the prompt file ({error})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"eval.prompts={path!r}: the prompt file holds no prompt")
    return prompts


def video_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/video/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def to_pixels(video: np.ndarray) -> Tensor:
    """uint8 (T, H, W, 3) frames -> float (3, T, H, W) in [-1, 1], the models' convention."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def gathered(mine: dict[int, object]) -> dict[int, object]:
    """Every rank's {index: value}, merged (ranks of a sequence group hold the same)."""
    if not dist.is_initialized():
        return dict(mine)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {index: value for part in parts for index, value in part.items()}


class EvalVideos:
    """The evaluation videos of one rank, and the scores of all of them; see the module
    docstring."""

    def __init__(
        self,
        cfg: EvalConfig,
        prompts: list[str],
        real: list[tuple[list[int], Tensor]],
        flow: FlowConfig,
        fps: float,
        runtime: Runtime,
        dims: ParallelDims,
    ):
        """`prompts`: one per video, in order; `real`: this rank's share of the held-out clips,
        (their indices in the evaluation set, float (B, 3, T, H, W) pixels in [-1, 1]) per
        batch (one shape each)."""
        self.cfg, self.flow, self.fps, self.runtime = cfg, flow, fps, runtime
        self.prompts = (prompts * -(-cfg.videos // len(prompts)))[: cfg.videos]
        share = list(range(dims.dp_rank, cfg.videos, dims.dp_size))
        padding = -(-cfg.videos // dims.dp_size) - len(share)
        self.plan = [(i, True) for i in share] + [(0, False)] * padding
        self.seconds: dict[str, float] = {}  # the latest evaluation's, on this rank
        device = runtime.device
        self.features = VideoFeatures(cfg.fvd_model, device) if cfg.fvd_model else None
        self.clip = ClipScorer(cfg.clip_model, device) if cfg.clip_model else None
        self.real_features = None
        if self.features is not None:
            mine = {}
            for indices, clips in real:  # a few clips at a time: a network's activations are large
                rows = torch.cat(
                    [self.features(part.to(device)) for part in clips.split(FEATURE_BATCH)]
                )
                mine |= dict(zip(indices, rows.numpy(), strict=True))
            every = gathered(mine)
            if len(every) < 2:
                raise ValueError(
                    f"eval.shards={cfg.shards!r}: FVD needs at least 2 held-out video clips "
                    f"among the eval.samples={cfg.samples} chosen, found {len(every)}"
                )
            self.real_features = np.stack([every[i] for i in sorted(every)])
        # The feature models named with their fingerprints, for the evaluation record.
        scorers = {"fvd_model": self.features, "clip_model": self.clip}
        self.models = {
            key: f"{getattr(cfg, key)} sha256:{scorer.fingerprint()}"
            for key, scorer in scorers.items()
            if scorer is not None
        }

    @torch.no_grad()
    def __call__(self, model: nn.Module, autoencoder: nn.Module, text_encoder: nn.Module):
        """(metrics, grid): FVD and CLIP score of the generated set, and a uint8 image of a few
        frames of its first videos (None where there is no video). `seconds` says where this
        rank's time went: generating its videos, and scoring them."""
        frames, height, width = self.cfg.video_shape
        mine, self.seconds = {}, {"generate": 0.0, "score": 0.0}
        for index, counted in self.plan:
            start = time.perf_counter()
            generator = VideoGenerator(
                model,
                autoencoder,
                text_encoder,
                self.flow,
                self.fps,
                self.cfg.sample_steps or None,
                seed=video_seed(self.cfg.seed, index),
                autocast=self.runtime.autocast,
            )
            video = generator.window(self.prompts[index], frames, height, width)
            scored = time.perf_counter()
            if counted:
                mine[index] = self._score(index, to_pixels(video)) | {"frames": _thumbs(video)}
            self.seconds["generate"] += scored - start
            self.seconds["score"] += time.perf_counter() - scored
        scored = gathered(mine)
        ordered = [scored[i] for i in range(self.cfg.videos)]
        metrics = {}
        if self.features is not None:
            generated = np.stack([v["features"] for v in ordered])
            metrics["eval/fvd"] = frechet_distance(self.real_features, generated)
        if self.clip is not None:
            metrics["eval/clip_score"] = float(np.mean([v["clip"] for v in ordered]))
        return metrics, _grid([v["frames"] for v in ordered[:GRID_VIDEOS]])

    def _score(self, index: int, pixels: Tensor) -> dict:
        batch = pixels[None].to(self.runtime.device)
        scores = {}
        if self.features is not None:
            scores["features"] = self.features(batch)[0].cpu().numpy()
        if self.clip is not None:
            scores["clip"] = self.clip(batch, [self.prompts[index]])[0].item()
        return scores


def _thumbs(video: np.ndarray) -> np.ndarray:
    """GRID_FRAMES evenly spaced frames of a uint8 (T, H, W, 3) video, side by side."""
    picks = np.linspace(0, len(video) - 1, GRID_FRAMES).round().astype(int)
    return np.concatenate([video[i] for i in picks], axis=1)


def _grid(rows: list[np.ndarray]) -> np.ndarray | None:
    return np.concatenate(rows, axis=0) if rows else None


def write_grid(grid: np.ndarray, path: Path) -> Path:
    Image.fromarray(grid).save(path)
    return path

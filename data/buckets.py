"""Buckets by resolution, aspect ratio and duration.

A sample goes to the largest bucket it fits without upscaling (and without cropping away
more than the allowed change of aspect ratio); each bucket's batch size follows a token
budget, so every batch costs about the same, and every batch has one shape (no padding).
Token counts come from the latent geometry train/ hands the table (model/geometry.py's
LatentGeometry): this module knows nothing of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class BucketConfig:
    # [frames, height, width] in pixels; frames = 1 is an image bucket.
    buckets: list[list[int]] = field(default_factory=lambda: [[1, 64, 64], [17, 64, 64]])
    token_budget: int = 4096  # latent tokens per batch
    max_aspect_change: float = 0.2  # largest |log(bucket aspect / sample aspect)| a crop may make


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    tokens_per_sample: int
    batch_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tokens_per_batch(self) -> int:
        return self.tokens_per_sample * self.batch_size


class TokenGeometry(Protocol):
    """What the table asks of the latent geometry train/ hands it."""

    def tokens(self, frames: int, height: int, width: int) -> int:
        """DiT tokens of a clip of this pixel size; ValueError naming the rule it breaks."""
        ...


class BucketTable:
    """The validated buckets of a table (most tokens first) and the rule assigning samples."""

    def __init__(self, cfg: BucketConfig, geometry: TokenGeometry):
        self.cfg = cfg
        self.geometry = geometry
        if not cfg.buckets:
            raise ValueError("buckets.buckets is empty: give at least one [frames, height, width]")
        if cfg.token_budget < 1:
            raise ValueError(f"buckets.token_budget={cfg.token_budget}: must be a positive int")
        if cfg.max_aspect_change < 0:
            raise ValueError(f"buckets.max_aspect_change={cfg.max_aspect_change}: must be >= 0")
        duplicates = [b for i, b in enumerate(cfg.buckets) if b in cfg.buckets[:i]]
        if duplicates:
            raise ValueError(f"buckets.buckets lists bucket {duplicates[0]} twice")
        self.buckets = sorted(
            (self._bucket(spec) for spec in cfg.buckets),
            key=lambda b: (b.tokens_per_sample, b.shape),
            reverse=True,
        )

    def _bucket(self, spec: list[int]) -> Bucket:
        if len(spec) != 3 or min(spec) < 1:
            raise ValueError(f"bucket {spec}: expected [frames, height, width] of positive ints")
        try:
            tokens = self.geometry.tokens(*spec)
        except ValueError as error:
            raise ValueError(f"bucket {spec}: {error}") from None
        batch_size = max(1, round(self.cfg.token_budget / tokens))
        return Bucket(*spec, tokens, batch_size)

    def cache_facts(self) -> dict:
        """What decides the plan's buckets (part of its cache key)."""
        return {
            "buckets": [[*b.shape, b.batch_size] for b in self.buckets],
            "max_aspect_change": self.cfg.max_aspect_change,
        }

    def assign(self, width: int, height: int, frames: int) -> Bucket | None:
        """The largest bucket a sample of this size fits without upscaling, or None.

        `frames` is the number of frames available at the pipeline's target frame rate.
        """
        aspect = width / height

        def aspect_change(bucket: Bucket) -> float:
            return abs(math.log((bucket.width / bucket.height) / aspect))

        # Both sides fit, so resizing to cover the bucket never upscales.
        fitting = [
            b
            for b in self.buckets
            if b.frames <= frames
            and b.height <= height
            and b.width <= width
            and aspect_change(b) <= self.cfg.max_aspect_change
        ]
        # Most tokens first; between equal token counts, the least cropping.
        return max(fitting, key=lambda b: (b.tokens_per_sample, -aspect_change(b)), default=None)

    def budget_deviation(self) -> dict[tuple[int, int, int], float]:
        """Relative deviation of each bucket's tokens per batch from the budget."""
        return {b.shape: b.tokens_per_batch / self.cfg.token_budget - 1 for b in self.buckets}

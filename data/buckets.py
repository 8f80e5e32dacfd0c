"""Buckets by resolution, aspect ratio and duration.

A sample goes to the largest bucket it fits without upscaling (and without cropping away
more than the allowed change of aspect ratio); each bucket's batch size follows a token
budget, so every batch costs about the same, and every batch has one shape (no padding).
Token counts use plain integers (compression and patch sizes): this module knows nothing
of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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


class BucketTable:
    """The validated buckets of a table (most tokens first) and the rule assigning samples."""

    def __init__(
        self,
        cfg: BucketConfig,
        temporal_compression: int,
        spatial_compression: int,
        patch: tuple[int, int, int],
    ):
        self.cfg = cfg
        self.tc, self.sc, self.patch = temporal_compression, spatial_compression, tuple(patch)
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
        frames, height, width = spec
        pt, ph, pw = self.patch
        if (frames - 1) % self.tc or ((frames - 1) // self.tc + 1) % pt:
            raise ValueError(
                f"bucket {spec}: frames must be 1 + k*{self.tc} (temporal compression) "
                f"giving a latent length divisible by the patch {pt}"
            )
        if height % (self.sc * ph) or width % (self.sc * pw):
            raise ValueError(
                f"bucket {spec}: height and width must be multiples of "
                f"{self.sc * ph} and {self.sc * pw} (compression x patch)"
            )
        tokens = (
            ((frames - 1) // self.tc + 1)
            // pt
            * (height // self.sc // ph)
            * (width // self.sc // pw)
        )
        batch_size = max(1, round(self.cfg.token_budget / tokens))
        return Bucket(frames, height, width, tokens, batch_size)

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

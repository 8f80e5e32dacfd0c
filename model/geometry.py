"""Latent geometry: how a clip's pixel size becomes latents (the autoencoder's compression) and
latents become DiT tokens (the patch), with the checks that a size fits.

Pure arithmetic, kept in one place: the DiT and the Wan adapter cut their token grid with
`token_grid`; train/ builds a `LatentGeometry` for the flow-matching objective, the sampler and
the bucket table (data/ receives it from train/ and never imports model/).

With a causal autoencoder of temporal compression c, latent frame 0 is pixel frame 0 and latent
frame j >= 1 is pixel frames c(j-1)+1 .. cj, so T latent frames are 1 + c(T-1) pixel frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Shape = tuple[int, int, int]


def token_grid(latent: Sequence[int], patch: Sequence[int]) -> Shape:
    """Tokens along T, H and W when latents (T, H, W) are cut into patches (t, h, w)."""
    if any(n % p for n, p in zip(latent, patch, strict=True)):
        raise ValueError(
            f"latent (T, H, W) = {tuple(latent)} must be divisible by patch_size {list(patch)}"
        )
    return tuple(n // p for n, p in zip(latent, patch, strict=True))


@dataclass(frozen=True)
class LatentGeometry:
    temporal_compression: int
    spatial_compression: int
    patch: Shape = (1, 1, 1)  # (t, h, w) in latent units

    @classmethod
    def of(cls, autoencoder, patch: Sequence[int]) -> LatentGeometry:
        """The geometry of an autoencoder (its compressions) and a DiT patch size."""
        return cls(autoencoder.temporal_compression, autoencoder.spatial_compression, tuple(patch))

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_compression

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_compression * (latent_frames - 1)

    def latent_shape(self, frames: int, height: int, width: int) -> Shape:
        """Latent (T, H, W) of a clip; ValueError unless the clip is 1 + k*c frames and its
        latents divide into whole patches."""
        tc, sc = self.temporal_compression, self.spatial_compression
        pt, ph, pw = self.patch
        if frames < 1 or (frames - 1) % tc or self.latent_frames(frames) % pt:
            raise ValueError(
                f"frames must be 1 + k*{tc} (temporal compression) "
                f"giving a latent length divisible by the patch {pt}"
            )
        if height < 1 or width < 1 or height % (sc * ph) or width % (sc * pw):
            raise ValueError(
                f"height and width must be multiples of "
                f"{sc * ph} and {sc * pw} (compression x patch)"
            )
        return (self.latent_frames(frames), height // sc, width // sc)

    def tokens(self, frames: int, height: int, width: int) -> int:
        """DiT tokens of a clip of this pixel size (checked as latent_shape checks it)."""
        return self.latent_tokens(self.latent_shape(frames, height, width))

    def latent_tokens(self, latent: Sequence[int]) -> int:
        """DiT tokens of latents (T, H, W)."""
        return math.prod(token_grid(latent, self.patch))

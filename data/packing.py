"""Native-size training: every sample keeps its own aspect ratio and duration, and samples of
any shape are packed into fixed-length token sequences (NaViT-style), beside the buckets of
data/buckets.py.

A sample's target shape. At most `packing.max_frames` frames at `data.fps` (never more than
the clip has), cut to whole latent frames and temporal patches; then the largest grid of
(height, width) tokens within `packing.max_tokens_per_sample` that keeps the sample's aspect
ratio, scaled down and never up. Rounding to the latent grid (autoencoder stride times patch)
is the only crop: among the grids whose aspect differs from the sample's by at most
`packing.max_aspect_change` (in |log|), the one with the most tokens wins, then the one with the
least change of aspect. Images are 1-frame samples in the same packs.

Packs. Each epoch, `pack_epoch` puts the plan's samples into packs of at most
`packing.sequence_tokens` tokens by first-fit-decreasing on the histogram of token counts, not
on samples: a pack's pattern (how many samples of each token count) is chosen greedily, largest
first, and repeated as often as the counts allow, so the work grows with the number of distinct
token counts (hundreds to a few thousand), not with the samples, and no Python object exists per
sample. The samples of each token count are shuffled (seeded) before they fill the patterns, and
the packs are shuffled after: which samples share a pack, and in which step it comes, is random;
which sizes share a pack follows the greedy pattern. A step takes `packing.packs_per_rank` packs
per rank. Token counts, not shapes, fill a pack: the DiT attends within each sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from data.buckets import Bucket


@dataclass
class PackingConfig:
    enabled: bool = False  # pack native-size samples instead of bucketing them
    sequence_tokens: int = 4096  # latent tokens of one packed sequence
    max_tokens_per_sample: int = 1024  # a sample is scaled down (never up) to fit this
    max_frames: int = 65  # pixel frames at data.fps a sample keeps at most
    max_aspect_change: float = 0.1  # largest |log(aspect change)| rounding to the grid may make
    packs_per_rank: int = 1  # packed sequences per rank and micro-step


class PackingGeometry(Protocol):
    """What packing asks of the latent geometry train/ hands it (model/geometry.py)."""

    temporal_compression: int
    spatial_compression: int
    patch: tuple[int, int, int]


class PackingTable:
    """Each sample's target shape (as a `Bucket`, one per distinct shape), from the packing
    config and the latent geometry; refuses settings that cannot pack."""

    def __init__(self, cfg: PackingConfig, geometry: PackingGeometry):
        self.cfg, self.geometry = cfg, geometry
        check_packing(cfg, geometry)
        tc, sc = geometry.temporal_compression, geometry.spatial_compression
        pt, ph, pw = geometry.patch
        self.frame_unit, self.height_unit, self.width_unit = tc, sc * ph, sc * pw
        self.latent_frame_patch = pt
        self.max_frames = cfg.max_frames

    def cache_facts(self) -> dict:
        """What decides the plan's shapes and packs (part of its cache key)."""
        geometry = self.geometry
        return {
            "packing": [
                self.cfg.sequence_tokens,
                self.cfg.max_tokens_per_sample,
                self.cfg.max_frames,
                self.cfg.max_aspect_change,
            ],
            "geometry": [
                geometry.temporal_compression,
                geometry.spatial_compression,
                list(geometry.patch),
            ],
        }

    def token_frames(self, frames: int) -> int:
        """Temporal patches of the longest whole-patch clip within `frames` pixel frames."""
        latent = 1 + (frames - 1) // self.frame_unit
        return latent // self.latent_frame_patch

    def target(self, width: int, height: int, frames: int) -> tuple[int, int, int] | None:
        """(frames, height, width) in pixels a sample of this size trains at (`frames`: those
        it has at data.fps), or None when it is too small for one token."""
        token_frames = self.token_frames(min(frames, self.max_frames))
        across, down = width // self.width_unit, height // self.height_unit
        if token_frames < 1 or across < 1 or down < 1:
            return None
        area = self.cfg.max_tokens_per_sample // token_frames  # tokens a frame may have
        aspect = (width / self.width_unit) / (height / self.height_unit)  # in tokens
        rows, columns = self._grid(down, across, area, aspect)
        pixel_frames = 1 + self.frame_unit * (token_frames * self.latent_frame_patch - 1)
        return pixel_frames, rows * self.height_unit, columns * self.width_unit

    def _grid(self, down: int, across: int, area: int, aspect: float) -> tuple[int, int]:
        """The (rows, columns) of tokens with the most tokens among the grids within `area`
        tokens, no larger than the sample (`down` x `across`), whose aspect is within
        packing.max_aspect_change of the sample's; where none is, the nearest in aspect."""
        rows = np.arange(1, min(down, area) + 1)
        widest = np.minimum(across, area // rows)  # per row count, the columns that fit
        slack = math.exp(self.cfg.max_aspect_change)
        columns = np.minimum(widest, np.floor(rows * aspect * slack + 1e-9)).astype(np.int64)
        close = columns >= np.maximum(1, np.ceil(rows * aspect / slack - 1e-9))
        if not close.any():
            columns = np.clip(np.rint(rows * aspect), 1, widest).astype(np.int64)
        change = np.abs(np.log(np.maximum(columns, 1) / rows / aspect))
        tokens = np.where(close, rows * columns, 0) if close.any() else -change
        # The most tokens (else the least change), then the least change of aspect.
        best = np.lexsort((change, -tokens))[0]
        return int(rows[best]), int(columns[best])

    def bucket(self, frames: int, height: int, width: int) -> Bucket:
        """The shape as a Bucket: its tokens, and as batch size the samples of that shape one
        packed sequence holds (what a held-out batch of it takes)."""
        tokens = (
            self.token_frames(frames) * (height // self.height_unit) * (width // self.width_unit)
        )
        return Bucket(frames, height, width, tokens, max(1, self.cfg.sequence_tokens // tokens))


def check_packing(cfg: PackingConfig, geometry: PackingGeometry) -> None:
    """Settings that cannot pack fail here, naming the key, before any process group exists."""
    if cfg.sequence_tokens < 1 or cfg.max_tokens_per_sample < 1 or cfg.packs_per_rank < 1:
        raise ValueError(
            "config keys packing.sequence_tokens, packing.max_tokens_per_sample and "
            "packing.packs_per_rank must be at least 1, got "
            f"{cfg.sequence_tokens}, {cfg.max_tokens_per_sample} and {cfg.packs_per_rank}"
        )
    if cfg.max_tokens_per_sample > cfg.sequence_tokens:
        raise ValueError(
            f"config key packing.max_tokens_per_sample={cfg.max_tokens_per_sample} is above "
            f"packing.sequence_tokens={cfg.sequence_tokens}: a sample must fit one sequence"
        )
    if cfg.max_aspect_change < 0:
        raise ValueError(f"config key packing.max_aspect_change={cfg.max_aspect_change} is < 0")
    tc, pt = geometry.temporal_compression, geometry.patch[0]
    token_frames = (1 + (cfg.max_frames - 1) // tc) // pt if cfg.max_frames >= 1 else 0
    if token_frames < 1:
        raise ValueError(
            f"config key packing.max_frames={cfg.max_frames} rounds to zero tokens: a sample "
            f"needs at least {1 + tc * (pt - 1)} frames (temporal compression {tc}, patch {pt})"
        )
    if cfg.max_tokens_per_sample < token_frames:
        raise ValueError(
            f"config key packing.max_tokens_per_sample={cfg.max_tokens_per_sample} rounds a "
            f"clip of packing.max_frames={cfg.max_frames} ({token_frames} token frames) to zero "
            "tokens a frame: raise it, or lower packing.max_frames"
        )


# --- packs -------------------------------------------------------------------------------


def pack_patterns(tokens: np.ndarray, counts: np.ndarray, capacity: int) -> list[tuple[dict, int]]:
    """First-fit-decreasing on a histogram: [(pattern, repeats)], where a pattern maps an index
    of `tokens` (sorted, most first) to how many samples of it one pack holds."""
    counts = counts.astype(np.int64).copy()
    patterns = []
    while counts.any():
        pattern, room = {}, capacity
        available = np.flatnonzero(counts)
        while room and len(available):
            # The largest available size that fits the room left.
            fits = available[tokens[available] <= room]
            if not len(fits):
                break
            index = int(fits[0])
            pattern[index] = min(int(counts[index]), room // int(tokens[index]))
            room -= pattern[index] * int(tokens[index])
            available = available[available != index]
        repeats = min(int(counts[i]) // n for i, n in pattern.items())
        for index, n in pattern.items():
            counts[index] -= repeats * n
        patterns.append((pattern, repeats))
    return patterns


def pack_epoch(
    tokens: np.ndarray, ids: list[np.ndarray], capacity: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(order, pack_start): the sample ids of every pack end to end, packs in a seeded random
    order, and where each pack starts in `order` (one more entry: the end). `tokens[j]` is the
    token count (most first) of the samples `ids[j]`, already shuffled."""
    patterns = pack_patterns(tokens, np.array([len(i) for i in ids]), capacity)
    taken = [0] * len(ids)
    blocks, lengths = [], []
    for pattern, repeats in patterns:
        columns = []
        for index, n in sorted(pattern.items()):
            columns.append(
                ids[index][taken[index] : taken[index] + repeats * n].reshape(repeats, n)
            )
            taken[index] += repeats * n
        block = np.concatenate(columns, axis=1)  # one row per pack
        blocks.append(block.ravel())
        lengths.append(np.full(repeats, block.shape[1], dtype=np.int64))
    order, length = np.concatenate(blocks), np.concatenate(lengths)
    start = np.concatenate([[0], np.cumsum(length)])
    shuffled = rng.permutation(len(length))
    new_length = length[shuffled]
    new_start = np.concatenate([[0], np.cumsum(new_length)])
    # Each shuffled pack's samples: its old start plus its offset inside it.
    offset = np.arange(new_start[-1], dtype=np.int64) - np.repeat(new_start[:-1], new_length)
    return order[np.repeat(start[:-1][shuffled], new_length) + offset], new_start


def pack_count(tokens: np.ndarray, counts: np.ndarray, capacity: int) -> int:
    """How many packs an epoch makes (the same every epoch: it depends on the histogram only)."""
    return sum(repeats for _, repeats in pack_patterns(tokens, counts, capacity))

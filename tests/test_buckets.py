"""The bucket table: batch sizes from the token budget, the assignment rule, table errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from data.buckets import BucketConfig, BucketTable
from model.geometry import LatentGeometry

ROOT = Path(__file__).resolve().parents[1]
TABLES = sorted((ROOT / "conf/buckets").glob("*.yaml"))


def table_from(cfg: BucketConfig) -> BucketTable:
    # The demo and GPU autoencoders' geometry: 4x8x8 compression, DiT patch (1, 2, 2).
    return BucketTable(cfg, LatentGeometry(4, 8, (1, 2, 2)))


def load_table(path: Path) -> BucketTable:
    values = OmegaConf.merge(OmegaConf.structured(BucketConfig), OmegaConf.load(path))
    return table_from(OmegaConf.to_object(values))


def test_tokens_and_batch_sizes_follow_the_budget():
    table = table_from(BucketConfig(buckets=[[17, 64, 64], [1, 48, 80]], token_budget=480))
    by_shape = {b.shape: b for b in table.buckets}
    # 17 frames -> 5 latent frames, 64 px -> 4 patches: 5*4*4 = 80 tokens, 480/80 = 6 a batch.
    assert (by_shape[17, 64, 64].tokens_per_sample, by_shape[17, 64, 64].batch_size) == (80, 6)
    # 1 frame, 48x80 px -> 3x5 patches: 15 tokens, round(480/15) = 32 a batch.
    assert (by_shape[1, 48, 80].tokens_per_sample, by_shape[1, 48, 80].batch_size) == (15, 32)
    assert [b.shape for b in table.buckets] == [(17, 64, 64), (1, 48, 80)]  # most tokens first


def test_a_realistic_gpu_mix_goes_to_the_expected_buckets():
    table = load_table(ROOT / "conf/buckets/sora_like.yaml")
    # (width, height, frames available at 24 fps) -> expected bucket
    mix = {
        "1080p 16:9, 10 s": ((1920, 1080, 240), (121, 720, 1280)),
        "phone 9:16, 3 s": ((1080, 1920, 72), (49, 1280, 720)),
        "480p 4:3, 16 s": ((640, 480, 384), (241, 416, 560)),  # 384 frames < 385
        "360p 16:9, 20 s": ((640, 360, 480), (241, 256, 448)),  # 360 px < 368: 256p
        "square 720, 4.5 s": ((720, 720, 108), (97, 480, 480)),  # > 49 frames at 640
        "4k still": ((3840, 2160, 1), (1, 720, 1280)),
        "320x240 clip": ((320, 240, 100), None),  # below every 4:3 bucket, 4:3 is no 16:9
    }
    print(f"\n{'sample':<20} {'w x h x frames':<16} bucket")
    for name, ((w, h, f), expected) in mix.items():
        bucket = table.assign(w, h, f)
        print(f"{name:<20} {f'{w}x{h}x{f}':<16} {bucket.shape if bucket else None}")
        assert (bucket.shape if bucket else None) == expected, name


@pytest.mark.parametrize("table_file", TABLES, ids=lambda p: p.stem)
def test_assignment_is_the_largest_fit_and_never_upscales(table_file):
    """On 2000 random sample sizes: the chosen bucket fits, and no fitting one is larger."""
    table = load_table(table_file)
    limit = table.cfg.max_aspect_change
    largest = max(max(b.height, b.width) for b in table.buckets)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w, h = (int(x) for x in rng.integers(16, 2 * largest, size=2))
        frames = int(rng.choice([1, int(rng.integers(1, 400))]))
        fitting = [
            b
            for b in table.buckets
            if b.height <= h
            and b.width <= w
            and b.frames <= frames
            and abs(math.log(b.width / b.height * h / w)) <= limit
        ]
        bucket = table.assign(w, h, frames)
        if not fitting:
            assert bucket is None
            continue
        assert bucket in fitting
        assert bucket.tokens_per_sample == max(b.tokens_per_sample for b in fitting)


def test_equal_tokens_prefer_the_least_cropping():
    table = table_from(BucketConfig(buckets=[[1, 64, 32], [1, 32, 64]], max_aspect_change=2.0))
    assert table.assign(100, 80, 1).shape == (1, 32, 64)  # landscape keeps landscape
    assert table.assign(80, 100, 1).shape == (1, 64, 32)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (BucketConfig(buckets=[]), "buckets.buckets is empty"),
        (BucketConfig(buckets=[[17, 64]]), r"bucket \[17, 64\]: expected \[frames, height"),
        (BucketConfig(buckets=[[8, 64, 64]]), r"bucket \[8, 64, 64\]: frames must be 1 \+ k\*4"),
        (BucketConfig(buckets=[[1, 64, 72]]), r"bucket \[1, 64, 72\]: height and width"),
        (BucketConfig(buckets=[[1, 64, 64], [1, 64, 64]]), r"bucket \[1, 64, 64\] twice"),
        (BucketConfig(token_budget=0), "buckets.token_budget=0"),
        (BucketConfig(max_aspect_change=-0.1), "buckets.max_aspect_change=-0.1"),
    ],
)
def test_invalid_tables_are_named(cfg, message):
    with pytest.raises(ValueError, match=message):
        table_from(cfg)

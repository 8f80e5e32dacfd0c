"""Deterministic decoding (data.augment=false) and the frozen-encoder cache it makes useful
(train.encoding_cache_mb): the same pixels every epoch, encodings reused, values unchanged."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from models import online_source

from data.pipeline import BatchStream, open_plan
from data.plan import DataState
from train.build import build_bucket_table
from train.config import register_configs, to_config
from train.encoders import FrozenEncoders
from train.latent_source import EncodingCache

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


def test_cache_encodes_each_key_once_and_drops_the_least_recently_used():
    calls = []

    def encode(rows):
        calls.append(list(rows))
        return (torch.tensor([[float(keys[i])] * 4 for i in rows]),)  # 16 bytes a key

    cache = EncodingCache(max_bytes=48)  # room for 3 keys
    keys = [1, 2, 3]
    (values,) = cache.lookup(keys, encode, torch.device("cpu"))
    assert calls == [[0, 1, 2]] and values[:, 0].tolist() == [1.0, 2.0, 3.0]

    keys = [3, 4, 1]  # 3 and 1 hit; 4 is encoded alone and evicts 2, the least recently used
    (values,) = cache.lookup(keys, encode, torch.device("cpu"))
    assert calls[-1] == [1] and values[:, 0].tolist() == [3.0, 4.0, 1.0]
    assert (cache.store.hits, cache.store.misses, cache.store.bytes) == (2, 4, 48)
    assert sorted(cache.store.entries) == [1, 3, 4]

    keys = [2]
    cache.lookup(keys, encode, torch.device("cpu"))
    assert calls[-1] == [0] and 2 in cache.store and 3 not in cache.store


@pytest.fixture(scope="module")
def parts(demo_shards):
    cfg = config("model=micro", f"data.shards={demo_shards}", "data.augment=false")
    torch.manual_seed(0)
    encoders = FrozenEncoders(cfg, torch.device("cpu"))
    table = build_bucket_table(cfg, encoders.autoencoder)

    def source(cache):
        return online_source(cfg, encoders, cache)

    return cfg, table, source


def batches(plan):
    """Epoch 0's planned batches."""
    return (plan.batch(0, 0, index) for index in range(len(plan.epoch(0, 0))))


def load_same_samples(cfg, table, epoch: int):
    """The plan's first batch of clips (more than one frame), decoded as in `epoch`."""
    plan = open_plan(cfg.data, table)
    stream = BatchStream(cfg.data, plan, 0, 1, DataState(cfg.data.seed, 0, 0))
    planned = next(b for b in batches(plan) if b.bucket.frames > 1)
    return stream.load(planned, epoch, 0, DataState(cfg.data.seed, epoch, 0))


def test_without_augmentation_a_sample_decodes_to_the_same_pixels_every_epoch(parts):
    cfg, table, _ = parts
    assert torch.equal(
        load_same_samples(cfg, table, 0).video, load_same_samples(cfg, table, 1).video
    )
    augmented = config(f"data.shards={cfg.data.shards}")
    first, second = (load_same_samples(augmented, table, e).video for e in (0, 1))
    assert not torch.equal(first, second)  # a random start and crop each epoch


def test_cached_encodings_equal_fresh_ones_and_the_next_epoch_hits(parts):
    cfg, table, source = parts
    batch, again = load_same_samples(cfg, table, 0), load_same_samples(cfg, table, 3)
    fields = ("latents", "text", "mask")
    encoded = source(None).encode(batch, torch.device("cpu"))
    fresh = [getattr(encoded, name) for name in fields]
    cached = source(EncodingCache(2**20))
    encoded = cached.encode(batch, torch.device("cpu"))
    first = [getattr(encoded, name) for name in fields]
    for value, expected in zip(first, fresh, strict=True):
        assert value.shape == expected.shape
        torch.testing.assert_close(value, expected, rtol=0, atol=0)  # the same batch: exact
    assert cached.cache.store.misses == 2 * len(batch.keys)  # every clip and caption, once

    captions_missing = sum(("caption", c) not in cached.cache.store for c in again.captions)
    second = cached.encode(again, torch.device("cpu")).latents  # epoch 3: captions may differ
    assert cached.cache.store.misses == 2 * len(batch.keys) + captions_missing  # every clip hit
    torch.testing.assert_close(second, first[0], rtol=0, atol=0)
    assert cached.metrics()["perf/encoding_cache_hit_share"] > 0.4
    assert np.isfinite(cached.metrics()["perf/encoding_cache_mib"])


def test_later_epochs_take_decoded_clips_from_the_cache(parts):
    cfg, table, _ = parts
    cached = replace(cfg.data, decoded_cache_mb=64)
    plan = open_plan(cached, table)
    stream = BatchStream(cached, plan, 0, 1, DataState(0, 0, 0))
    planned = next(b for b in batches(plan) if b.bucket.frames > 1)
    first = stream.load(planned, 0, 0, DataState(0, 0, 0))

    def no_read(sample_id: int):
        raise AssertionError(f"sample {sample_id} read again: a later epoch must not read")

    stream.reader.read = no_read
    second = stream.load(planned, 1, 0, DataState(0, 1, 0))
    assert torch.equal(first.video, second.video) and torch.equal(
        first.video, load_same_samples(cfg, table, 0).video
    )
    assert stream._decoded.hits == len(planned.sample_ids)


def test_a_stream_served_from_the_decoded_cache_keeps_yielding(parts):
    """A read-ahead deeper than the dataset (400 reads, 320 samples): once every clip is cached
    there is nothing left to read ahead, and batches still come out, in plan order (the
    read-ahead waited for reads that would never come: the stream hung)."""
    cfg, table, _ = parts
    cached = replace(cfg.data, decoded_cache_mb=256, num_workers=0, read_ahead=400)
    plan = open_plan(cached, table)
    stream = BatchStream(cached, plan, 0, 1, DataState(0, 0, 0))
    per_epoch = len(plan.epoch(0, 0))
    reads = []
    read = stream.reader.read
    stream.reader.read = lambda sample_id: reads.append(sample_id) or read(sample_id)
    batches = list(itertools.islice(iter(stream), 8 * per_epoch))
    assert [(b.epoch, b.plan_index) for b in batches] == [
        (epoch, index) for epoch in range(8) for index in range(per_epoch)
    ]
    planned = {i for b in batches for i in plan.batch(0, b.epoch, b.plan_index).sample_ids}
    assert planned <= set(reads)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.encoding_cache_mb=-1"], "train.encoding_cache_mb=-1"),
        (["data.decoded_cache_mb=-1", "data.augment=false"], "data.decoded_cache_mb=-1"),
        (["data.decoded_cache_mb=8"], "data.decoded_cache_mb needs data.augment=false"),
    ],
)
def test_bad_cache_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(*overrides)

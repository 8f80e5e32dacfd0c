"""The loader on real demo shards: shard specs, the per-epoch plan split over ranks, epoch
ends, resume across world sizes, failed batches and the data state's errors."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data.buckets import BucketConfig, BucketTable
from data.pipeline import DataConfig, DataState, build_loader, load_index, plan_epoch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table() -> BucketTable:
    values = OmegaConf.merge(
        OmegaConf.structured(BucketConfig), OmegaConf.load(ROOT / "conf/buckets/demo.yaml")
    )
    return BucketTable(OmegaConf.to_object(values), 4, 8, (1, 2, 2))


def take(shards: Path, table: BucketTable, rank: int, world: int, state: DataState, n: int):
    stream = build_loader(DataConfig(shards=str(shards), num_workers=0), table, rank, world, state)
    return [next(stream) for _ in range(n)]


def planned_keys(samples: list[dict], table: BucketTable, epoch: int) -> list[list[str]]:
    plan, _ = plan_epoch(samples, table, 8.0, 0, epoch)
    return [[samples[i]["key"] for i in batch.sample_ids] for batch in plan]


def test_every_form_of_shard_spec_finds_the_same_samples(demo_shards, tmp_path):
    tars = sorted(demo_shards.glob("*.tar"))
    by_folder = load_index(str(demo_shards))
    as_list = load_index(",".join(str(t) for t in tars))
    as_glob = load_index(str(demo_shards / "shard-*.tar"))
    # A URL is copied into the cache, then indexed by scanning like any foreign tar.
    urls = ",".join(t.as_uri() for t in tars)
    as_urls = load_index(urls, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.tar"))) == len(tars)

    def strip(samples):
        return [{k: v for k, v in s.items() if k != "shard"} for s in samples]

    assert strip(as_list) == strip(as_glob) == strip(as_urls) == strip(by_folder)
    assert len(by_folder) == 320


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "data.shards is empty"),
        (" , ", "data.shards is empty"),
        ("{tmp}/nowhere/*.tar", "matches no .tar file"),
        ("{shards},{tmp}/gone.tar", "no such shard folder or file .*gone.tar"),
        ("{tmp}", "holds no .tar"),
    ],
)
def test_bad_shard_specs_are_named(demo_shards, tmp_path, spec, message):
    with pytest.raises(FileNotFoundError, match=message):
        load_index(spec.format(tmp=tmp_path, shards=demo_shards))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_epoch_of_the_global_plan(demo_shards, table, world):
    """Rank r takes plan batches r, r + world, ...; the epoch ends when fewer than `world`
    are left, and the next epoch is a new shuffle."""
    samples = load_index(str(demo_shards))
    epoch0, epoch1 = planned_keys(samples, table, 0), planned_keys(samples, table, 1)
    assert epoch0 != epoch1
    rows = len(epoch0) // world
    streams = [
        take(demo_shards, table, r, world, DataState(0, 0, 0), rows + 1) for r in range(world)
    ]
    for rank, batches in enumerate(streams):
        assert [b.keys for b in batches[:rows]] == epoch0[rank : rows * world : world]
        assert batches[rows].keys == epoch1[rank]  # the next epoch starts at its batch `rank`
        for row, batch in enumerate(batches[:rows]):
            consumed = sum(len(keys) for keys in epoch0[: (row + 1) * world])
            ends_epoch = row == rows - 1
            expected = DataState(0, 1, 0) if ends_epoch else DataState(0, 0, consumed)
            assert DataState.from_dict(batch.state_after) == expected
    epoch_keys = [k for batches in streams for b in batches[:rows] for k in b.keys]
    assert len(epoch_keys) == len(set(epoch_keys))  # disjoint ranks


def test_resume_on_fewer_ranks_repeats_and_skips_nothing(demo_shards, table):
    """Three ranks take one row (plan batches 0-2); two ranks go on from batch 3, so the
    rows now start at odd plan indices."""
    samples = load_index(str(demo_shards))
    epoch0 = planned_keys(samples, table, 0)
    before = [take(demo_shards, table, r, 3, DataState(0, 0, 0), 1)[0] for r in range(3)]
    state = DataState.from_dict(json.loads(json.dumps(before[0].state_after)))
    assert all(DataState.from_dict(b.state_after) == state for b in before)
    assert state.consumed_samples == sum(len(keys) for keys in epoch0[:3])
    rows_left = (len(epoch0) - 3) // 2
    after = [take(demo_shards, table, r, 2, state, rows_left) for r in range(2)]
    consumed = [k for batch in before for k in batch.keys]
    consumed += [k for row in range(rows_left) for rank in after for k in rank[row].keys]
    assert consumed == [k for keys in epoch0[: 3 + 2 * rows_left] for k in keys]


def test_state_errors_are_clear(demo_shards, table):
    with pytest.raises(ValueError, match="consumed_samples=1 is not a batch boundary of epoch 0"):
        take(demo_shards, table, 0, 1, DataState(0, 0, 1), 1)
    with pytest.raises(ValueError, match="expected exactly the keys"):
        DataState.from_dict({"seed": 0, "epoch": 0})
    with pytest.raises(ValueError, match="fewer than the 64 data-parallel ranks"):
        take(demo_shards, table, 0, 64, DataState(0, 0, 0), 1)


def test_a_batch_that_fails_entirely_is_counted_in_the_next(demo_shards, table, tmp_path, caplog):
    """With every mp4 in the shard garbage, only image batches come out, each counting the
    video samples of the batches planned since the previous one."""
    broken = tmp_path / "broken"
    broken.mkdir()
    with (
        tarfile.open(demo_shards / "shard-000000.tar") as tar_in,
        tarfile.open(broken / "shard-000000.tar", "w") as tar_out,
    ):
        for member in tar_in:
            data = tar_in.extractfile(member).read()
            if member.name.endswith(".mp4"):
                data = bytes(len(data))
            tar_out.addfile(member, io.BytesIO(data))
    samples = load_index(str(broken))
    plan, _ = plan_epoch(samples, table, 8.0, 0, 0)
    expected, failed = [], 0
    for batch in plan:
        if batch.bucket.frames == 1:
            expected.append((batch.bucket.shape, failed))
            failed = 0
        else:
            failed += len(batch.sample_ids)
    assert len(expected) >= 2 and failed > 0
    with caplog.at_level(logging.WARNING, logger="data.pipeline"):
        batches = take(broken, table, 0, 1, DataState(0, 0, 0), len(expected))
    assert [(b.bucket, b.skipped) for b in batches] == expected
    assert "skipping sample" in caplog.text and "shard-000000.tar" in caplog.text


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_image_share_sets_the_share_of_image_batches_deterministically(demo_shards, table, share):
    samples = load_index(str(demo_shards))
    natural, _ = plan_epoch(samples, table, 8.0, 0, 0)
    plan, _ = plan_epoch(samples, table, 8.0, 0, 0, image_share=share)
    images = sum(batch.bucket.frames == 1 for batch in plan)
    assert images == pytest.approx(share * len(plan), abs=0.5)
    natural_images = sum(batch.bucket.frames == 1 for batch in natural)
    # The scarcer kind is kept whole; the plan is a seeded function of (seed, epoch) alone.
    assert images == natural_images or len(plan) - images == len(natural) - natural_images
    assert plan == plan_epoch(samples, table, 8.0, 0, 0, image_share=share)[0]
    assert plan != plan_epoch(samples, table, 8.0, 0, 1, image_share=share)[0]


def test_image_share_that_cannot_be_met_is_named(demo_shards, table):
    videos_only = [s for s in load_index(str(demo_shards)) if s["meta"]["frames"] > 1]
    with pytest.raises(ValueError, match="data.image_share=0.3: the plan has 0 image"):
        plan_epoch(videos_only, table, 8.0, 0, 0, image_share=0.3)


def test_batches_carry_frame_rate_and_native_size(demo_shards, table):
    batch = take(demo_shards, table, 0, 1, DataState(0, 0, 0), 1)[0]
    samples = {s["key"]: s["meta"] for s in load_index(str(demo_shards))}
    expected = [[samples[key]["height"], samples[key]["width"]] for key in batch.keys]
    assert batch.native_size.tolist() == expected
    assert batch.fps.shape == (len(batch.keys),)

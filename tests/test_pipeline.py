"""The loader on real demo shards: shard specs, the per-epoch plan split over ranks, epoch
ends, resume across world sizes, failed batches, the data state's errors and the plan cache."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from manifests import manifest_rows, planned_keys
from omegaconf import OmegaConf

from data.buckets import BucketConfig, BucketTable
from data.manifest import SCHEMA
from data.manifest import main as manifest_command
from data.pipeline import DataConfig, SkipGuard, SkippedTooMany, build_loader, open_plan
from data.plan import DataPlan, DataState, assign_buckets, frames_at_fps
from model.geometry import LatentGeometry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table() -> BucketTable:
    values = OmegaConf.merge(
        OmegaConf.structured(BucketConfig), OmegaConf.load(ROOT / "conf/buckets/demo.yaml")
    )
    return BucketTable(OmegaConf.to_object(values), LatentGeometry(4, 8, (1, 2, 2)))


def take(shards: Path, table: BucketTable, rank: int, world: int, state: DataState, n: int, **data):
    cfg = DataConfig(shards=str(shards), num_workers=0, **data)
    stream = build_loader(cfg, open_plan(cfg, table), rank, world, state)
    return [next(stream) for _ in range(n)]


def demo_plan(shards: Path, table: BucketTable, image_share: float | None = None) -> DataPlan:
    return DataPlan.open(str(shards), table, 8.0, image_share)


def test_every_form_of_shard_spec_finds_the_same_samples(demo_shards, tmp_path):
    tars = sorted(demo_shards.glob("*.tar"))
    by_folder = manifest_rows(str(demo_shards))
    as_list = manifest_rows(",".join(str(t) for t in tars))
    as_glob = manifest_rows(str(demo_shards / "shard-*.tar"))
    as_urls = manifest_rows(",".join(t.as_uri() for t in tars))
    as_manifest = manifest_rows(str(demo_shards / "manifest.parquet"))
    assert as_list == as_glob == as_urls == as_manifest == by_folder
    assert len(by_folder) == 320 and {row["shard"] for row in by_folder} == {str(t) for t in tars}
    # webdataset's brace lists, a comma inside the braces too, over a folder of three shards
    three = tmp_path / "three"
    three.mkdir()
    for index in range(3):
        (three / f"shard-{index:06d}.tar").symlink_to(tars[0])
    manifest_command(["index", str(three)])
    everything = manifest_rows(str(three))
    assert manifest_rows(f"{three}/shard-{{000000..000002}}.tar") == everything
    first_and_last = manifest_rows(f"{three}/shard-{{000000,000002}}.tar,{three}/shard-000001.tar")
    assert sorted(map(str, first_and_last)) == sorted(map(str, everything))
    assert len(everything) == 3 * 320


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "data.shards is empty"),
        (" , ", "data.shards is empty"),
        ("{tmp}/nowhere/*.tar", "matches no .tar file"),
        ("{shards},{tmp}/gone.tar", "no such shard folder or file .*gone.tar"),
        ("{tmp}/nowhere", "no such shard folder or file .*nowhere"),
        ("{tmp}/none.parquet", "no manifest .*none.parquet"),
        ("{tmp}", "no manifest .*: index the folder's shards with `python -m data.manifest index"),
    ],
)
def test_bad_shard_specs_are_named(demo_shards, tmp_path, spec, message):
    with pytest.raises(FileNotFoundError, match=message):
        manifest_rows(spec.format(tmp=tmp_path, shards=demo_shards))


def test_a_folder_of_the_old_index_format_names_the_command_that_converts_it(demo_shards, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for tar in demo_shards.glob("*.tar"):
        (old / tar.name).symlink_to(tar)
    (old / "index.json").write_text('{"version": 1, "shards": []}')
    with pytest.raises(FileNotFoundError, match=f"python -m data.manifest index {old}"):
        manifest_rows(str(old))
    manifest_command(["index", str(old), "--workers", "2"])
    assert manifest_rows(str(old)) == [
        {**row, "shard": str(old / Path(row["shard"]).name)}
        for row in manifest_rows(str(demo_shards))
    ]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_epoch_of_the_global_plan(demo_shards, table, world):
    """Rank r takes plan batches r, r + world, ...; the epoch ends when fewer than `world`
    are left, and the next epoch is a new shuffle."""
    plan = demo_plan(demo_shards, table)
    epoch0, epoch1 = planned_keys(plan, 0), planned_keys(plan, 1)
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
    epoch0 = planned_keys(demo_plan(demo_shards, table), 0)
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


def broken_videos(demo_shards: Path, folder: Path) -> Path:
    """The first demo shard with every mp4 garbage (zeros of the same size), indexed."""
    folder.mkdir()
    with (
        tarfile.open(demo_shards / "shard-000000-00.tar") as tar_in,
        tarfile.open(folder / "shard-000000-00.tar", "w") as tar_out,
    ):
        for member in tar_in:
            data = tar_in.extractfile(member).read()
            if member.name.endswith(".mp4"):
                data = bytes(len(data))
            tar_out.addfile(member, io.BytesIO(data))
    manifest_command(["index", str(folder)])
    return folder


def test_a_batch_that_fails_entirely_is_counted_in_the_next(demo_shards, table, tmp_path, caplog):
    """With every mp4 in the shard garbage, only image batches come out, each counting the
    video samples of the batches planned since the previous one (the guard against mostly
    failing data switched off)."""
    broken = broken_videos(demo_shards, tmp_path / "broken")
    plan = demo_plan(broken, table)
    expected, failed = [], 0
    for batch in (plan.batch(0, 0, i) for i in range(len(plan.epoch(0, 0)))):
        if batch.bucket.frames == 1:
            expected.append((batch.bucket.shape, failed))
            failed = 0
        else:
            failed += len(batch.sample_ids)
    assert len(expected) >= 2 and failed > 0
    with caplog.at_level(logging.WARNING, logger="data.pipeline"):
        state = DataState(0, 0, 0)
        batches = take(broken, table, 0, 1, state, len(expected), max_skipped_share=1.0)
    assert [(b.bucket, b.skipped) for b in batches] == expected
    assert "skipping sample" in caplog.text and "shard-000000-00.tar" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_data_that_mostly_fails_stops_the_stream_naming_the_reason(
    demo_shards, table, tmp_path, workers
):
    """Every video of the shard garbage: about half its samples fail, more than the default
    data.max_skipped_share (0.25), and the stream stops once a window is seen, in the trainer's
    process, with the decoder's reason."""
    broken = broken_videos(demo_shards, tmp_path / "broken")
    cfg = DataConfig(shards=str(broken), num_workers=workers, skipped_window=64)
    stream = build_loader(cfg, open_plan(cfg, table), 0, 1, DataState(0, 0, 0))
    taken = 0
    with pytest.raises(
        Exception, match=r"could not be read or decoded, more than data\.max_"
    ) as error:
        for _ in stream:
            taken += 1
    print(f"\nstopped after {taken} batches: {error.value}")
    assert "data.max_skipped_share=0.25 of data.skipped_window=64" in str(error.value)
    assert "DecodeError" in str(error.value) and "<sample>" in str(error.value)
    assert taken < 20


def test_a_few_failures_do_not_trip_the_guard():
    guard = SkipGuard(max_share=0.25, window=100)
    for _ in range(50):
        guard.observe(kept=9, skipped=1)  # 10%
    guard.observe(kept=0, skipped=15)  # a burst: 24 of the last 105
    guard.observe(kept=0, skipped=3)  # 27 of the last 108: 25%, not more
    with pytest.raises(SkippedTooMany, match="28 of the last 109 samples"):
        guard.observe(kept=0, skipped=1)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_image_share_sets_the_share_of_image_batches_deterministically(demo_shards, table, share):
    def batches(image_share, epoch):
        plan = demo_plan(demo_shards, table, image_share)
        return [plan.batch(0, epoch, i) for i in range(len(plan.epoch(0, epoch)))]

    natural, plan = batches(None, 0), batches(share, 0)
    images = sum(batch.bucket.frames == 1 for batch in plan)
    assert images == pytest.approx(share * len(plan), abs=0.5)
    natural_images = sum(batch.bucket.frames == 1 for batch in natural)
    # The scarcer kind is kept whole; the plan is a seeded function of (seed, epoch) alone.
    assert images == natural_images or len(plan) - images == len(natural) - natural_images
    assert plan == batches(share, 0)
    assert plan != batches(share, 1)


def videos_only(demo_shards: Path, folder: Path) -> Path:
    """A manifest file of the demo's clips alone (its shards named by absolute path)."""
    rows = [row for row in manifest_rows(str(demo_shards)) if row["frames"] > 1]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "videos.parquet")
    return folder / "videos.parquet"


def test_image_share_that_cannot_be_met_is_named(demo_shards, table, tmp_path):
    plan = demo_plan(videos_only(demo_shards, tmp_path), table, image_share=0.3)
    with pytest.raises(ValueError, match="data.image_share=0.3: the plan has 0 image"):
        plan.epoch(0, 0)


def test_an_image_share_that_leaves_fewer_batches_than_ranks_fails_instead_of_looping(
    demo_shards, table
):
    """image_share=1 keeps only the image batches: fewer than a row of all the batches needs."""
    plan = demo_plan(demo_shards, table, image_share=1.0)
    world = len(plan.epoch(0, 0)) + 1
    assert world <= plan.batches_per_epoch  # enough batches before the mix, too few after it
    with pytest.raises(ValueError, match=f"epoch 0's plan has .* fewer than the {world} data-par"):
        next(plan.rows(DataState(0, 0, 0), 0, world))


def test_bucket_assignment_follows_the_table_rule_for_every_sample(demo_shards, table):
    rows = manifest_rows(str(demo_shards))
    column = {
        name: np.array([row[name] for row in rows]) for name in ("width", "height", "frames", "fps")
    }
    available = frames_at_fps(column["frames"], column["fps"], 8.0)
    assigned = assign_buckets(column["width"], column["height"], available, table)
    expected = [
        table.assign(r["width"], r["height"], int(f)) for r, f in zip(rows, available, strict=True)
    ]
    assert [table.buckets[i] if i >= 0 else None for i in assigned] == expected
    assert (assigned >= 0).sum() > 200 and (assigned < 0).sum() > 0


def test_the_plan_is_cached_beside_the_manifest_and_rebuilt_when_it_changes(
    demo_shards, table, tmp_path
):
    folder = tmp_path / "copy"
    folder.mkdir()
    for tar in demo_shards.glob("*.tar"):
        (folder / tar.name).symlink_to(tar)
    (folder / "manifest.parquet").write_bytes((demo_shards / "manifest.parquet").read_bytes())
    first = demo_plan(folder, table)
    cached = sorted(p.name for p in (folder / ".tessera-plans").iterdir())
    assert len(cached) == 2 and cached[0].startswith("plan-")  # the plan and its lock
    again = demo_plan(folder, table)
    assert again.folder == first.folder and planned_keys(again, 0) == planned_keys(first, 0)
    other_fps = DataPlan.open(str(folder), table, 4.0)
    assert other_fps.folder != first.folder
    rows = manifest_rows(str(folder))[:100]
    renamed = [{**row, "shard": Path(row["shard"]).name} for row in rows]
    pq.write_table(pa.Table.from_pylist(renamed, schema=SCHEMA), folder / "manifest.parquet")
    smaller = demo_plan(folder, table)
    assert smaller.folder != first.folder and smaller.num_samples == 100


def test_batches_carry_frame_rate_and_native_size(demo_shards, table):
    batch = take(demo_shards, table, 0, 1, DataState(0, 0, 0), 1)[0]
    samples = {row["key"]: row for row in manifest_rows(str(demo_shards))}
    expected = [[samples[key]["height"], samples[key]["width"]] for key in batch.keys]
    assert batch.native_size.tolist() == expected
    assert batch.fps.shape == (len(batch.keys),)

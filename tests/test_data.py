"""Shards, decoding, buckets and the resumable loader, on real clips in real tar shards."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from manifests import manifest_rows
from omegaconf import OmegaConf

from data.buckets import BucketConfig, BucketTable
from data.decode import DecodeError, decode_clip, probe
from data.packing import PackingConfig, PackingTable
from data.pipeline import Batch, DataConfig, PackedBatch, build_loader, open_plan
from data.plan import DataState
from data.prepare import load_config, prepare
from model.geometry import LatentGeometry

ROOT = Path(__file__).resolve().parents[1]


def table_from(cfg: BucketConfig) -> BucketTable:
    return BucketTable(cfg, LatentGeometry(4, 8, (1, 2, 2)))


def demo_table() -> BucketTable:
    values = OmegaConf.load(ROOT / "conf/buckets/demo.yaml")
    return table_from(
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BucketConfig), values))
    )


# --- decoding -----------------------------------------------------------------------------


def test_decode_at_target_fps_matches_full_decode(clips):
    data = (clips / "bikes.mp4").read_bytes()
    meta = probe(data, "mp4")
    assert (meta["width"], meta["height"], meta["frames"], meta["fps"]) == (640, 272, 250, 25.0)
    rng = np.random.default_rng(0)
    frames = decode_clip(data, "mp4", 9, 12.5, (272, 640), (272, 640), rng, "bikes")
    assert frames.shape == (9, 272, 640, 3) and frames.dtype == np.uint8
    import decord

    full = decord.VideoReader(str(clips / "bikes.mp4")).get_batch(list(range(250))).asnumpy()
    # 25 fps sampled at 12.5 fps is every second frame from some start.
    diffs = [
        np.abs(full[s : s + 17 : 2].astype(int) - frames.astype(int)).mean() for s in range(233)
    ]
    assert min(diffs) < 1.0


def test_decode_resizes_to_cover_then_crops(clips):
    data = (clips / "bigbuckbunny.mp4").read_bytes()
    frames = decode_clip(
        data, "mp4", 5, 8.0, (48, 48), (720, 1280), np.random.default_rng(1), "bbb"
    )
    assert frames.shape == (5, 48, 48, 3)


def test_corrupt_bytes_raise_naming_the_key():
    with pytest.raises(DecodeError, match="sample 'broken-7'"):
        decode_clip(
            b"\x00" * 4096, "mp4", 5, 8.0, (32, 32), (64, 64), np.random.default_rng(0), "broken-7"
        )


# --- buckets ------------------------------------------------------------------------------


def test_hand_made_mix_goes_to_the_expected_buckets():
    table = demo_table()
    # (width, height, frames available at the target fps) -> expected bucket
    mix = {
        "landscape 16:9 long": ((160, 90, 40), (17, 48, 80)),
        "portrait long": ((90, 160, 40), (17, 80, 48)),
        "square short": ((100, 100, 10), (9, 64, 64)),
        "4:3 very short": ((96, 72, 6), (5, 48, 64)),
        "wide cinema": ((235, 100, 17), (17, 48, 112)),
        "image": ((300, 300, 1), (1, 64, 64)),
        "too small": ((40, 40, 20), None),
        "3 frames: a still": ((100, 100, 3), (1, 64, 64)),
    }
    print(f"\n{'sample':<20} {'w x h x frames':<16} bucket")
    for name, ((w, h, f), expected) in mix.items():
        bucket = table.assign(w, h, f)
        got = bucket.shape if bucket else None
        print(f"{name:<20} {f'{w}x{h}x{f}':<16} {got}")
        assert got == expected, name
        if bucket:
            assert bucket.width <= w and bucket.height <= h and bucket.frames <= f  # no upscaling


@pytest.mark.parametrize(
    "table_file", sorted((ROOT / "conf/buckets").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_bucket_table_keeps_the_token_budget(table_file):
    values = OmegaConf.merge(OmegaConf.structured(BucketConfig), OmegaConf.load(table_file))
    table = table_from(OmegaConf.to_object(values))
    for shape, deviation in table.budget_deviation().items():
        assert abs(deviation) <= 0.15, (table_file.name, shape, deviation)


def test_invalid_bucket_is_named():
    with pytest.raises(ValueError, match=r"bucket \[6, 64, 64\]"):
        table_from(BucketConfig(buckets=[[6, 64, 64]]))
    with pytest.raises(ValueError, match=r"bucket \[5, 60, 64\]"):
        table_from(BucketConfig(buckets=[[5, 60, 64]]))


# --- shards -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_source(tmp_path_factory, clips) -> Path:
    """Two real clips, an image, a corrupt file and a missing one, with captions."""
    source = tmp_path_factory.mktemp("source")
    (source / "carphone.mp4").write_bytes((clips / "carphone_pristine.mp4").read_bytes())
    (source / "bikes.mp4").write_bytes((clips / "bikes.mp4").read_bytes())
    from PIL import Image

    Image.fromarray(np.full((72, 96, 3), 128, np.uint8)).save(source / "grey.png")
    (source / "broken.mp4").write_bytes(b"not a video at all" * 100)
    with open(source / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "caption", "recaption"])
        writer.writeheader()
        writer.writerow(
            {
                "file": "carphone.mp4",
                "caption": "a man on the phone in a car",
                "recaption": "a man talks on a mobile phone while driving",
            }
        )
        writer.writerow({"file": "bikes.mp4", "caption": "cyclists on a street", "recaption": ""})
        writer.writerow({"file": "grey.png", "caption": "a grey image", "recaption": ""})
        writer.writerow({"file": "broken.mp4", "caption": "broken", "recaption": ""})
        writer.writerow({"file": "missing.mp4", "caption": "missing", "recaption": ""})
    return source


def test_writer_skips_bad_files_and_writes_valid_webdataset(small_source, tmp_path):
    report = prepare(
        str(small_source / "captions.csv"), tmp_path / "shards", load_config([]), "inline"
    )
    assert report["samples"] == 3
    assert sorted(row["file"] for row in report["dropped"]) == ["broken.mp4", "missing.mp4"]
    (tar,) = (tmp_path / "shards").glob("*.tar")
    read = list(wds.WebDataset(str(tar), shardshuffle=False))
    metas = {json.loads(s["json"])["source"]: s for s in read}
    assert set(metas) == {"carphone.mp4", "bikes.mp4", "grey.png"}
    assert json.loads(metas["carphone.mp4"]["json"])["frames"] == 120
    # The manifest's spans read back exactly the members' bytes.
    for row in manifest_rows(str(tmp_path / "shards")):
        with open(row["shard"], "rb") as f:
            f.seek(row["offset"])
            data = f.read(row["size"])
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            meta = json.loads(tar.extractfile(f"{row['key']}.json").read())
            media = tar.extractfile(f"{row['key']}.{row['media']}").read()
        assert media == metas[meta["source"]][row["media"]]


def test_missing_shard_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        manifest_rows(str(tmp_path / "no-such-folder"))


# --- the loader ---------------------------------------------------------------------------


def take(cfg: DataConfig, table: BucketTable, rank: int, world: int, state: DataState, n: int):
    stream = build_loader(cfg, open_plan(cfg, table), rank, world, state)
    return [next(stream) for _ in range(n)]


def test_batches_have_one_shape_and_no_upscaling(demo_shards):
    table = demo_table()
    cfg = DataConfig(shards=str(demo_shards), num_workers=2)
    samples = {row["key"]: row for row in manifest_rows(str(demo_shards))}
    seen = Counter()
    for batch in take(cfg, table, 0, 1, DataState(0, 0, 0), 25):
        frames, height, width = batch.bucket
        assert batch.video.shape == (len(batch.keys), frames, height, width, 3)
        assert len(batch.captions) == len(batch.keys)
        for key in batch.keys:
            meta = samples[key]
            assert meta["width"] >= width and meta["height"] >= height
        seen[batch.bucket] += 1
    assert len(seen) > 3  # several buckets, mixed in one stream
    assert any(shape[0] == 1 for shape in seen)  # images are 1-frame samples in the same stream


def test_resume_from_a_state_continues_the_stream_exactly(demo_shards):
    table = demo_table()
    cfg = DataConfig(shards=str(demo_shards), num_workers=2)
    straight = take(cfg, table, 0, 1, DataState(0, 0, 0), 12)
    resumed = take(cfg, table, 0, 1, DataState.from_dict(straight[5].state_after), 6)
    assert [b.keys for b in resumed] == [b.keys for b in straight[6:]]
    assert all(
        np.array_equal(a.video, b.video) for a, b in zip(resumed, straight[6:], strict=False)
    )
    assert [b.captions for b in resumed] == [b.captions for b in straight[6:]]


def batch_tensors(batch: Batch | PackedBatch) -> list[torch.Tensor]:
    groups = batch.groups if isinstance(batch, PackedBatch) else [batch]
    return [t for g in groups for t in (g.video, g.fps, g.native_size)]


@pytest.mark.parametrize("packed", [False, True], ids=["buckets", "packing"])
def test_workers_do_not_change_the_stream(demo_shards, packed):
    """A worker hands a batch over in one shared block per dtype, however many tensors (and
    shape groups) it holds: the same batches as in one process."""
    table = demo_table()
    if packed:
        packing = PackingConfig(True, sequence_tokens=480, max_tokens_per_sample=240, max_frames=17)
        table = PackingTable(packing, LatentGeometry(4, 8, (1, 2, 2)))
    batches = {
        workers: take(
            DataConfig(shards=str(demo_shards), num_workers=workers),
            table,
            0,
            1,
            DataState(0, 0, 0),
            8,
        )
        for workers in (0, 2)
    }
    single, multi = batches[0], batches[2]
    assert [b.keys for b in single] == [b.keys for b in multi]
    for one, other in zip(single, multi, strict=True):
        for a, b in zip(batch_tensors(one), batch_tensors(other), strict=True):
            assert torch.equal(a, b)
        blocks = {t.untyped_storage().data_ptr() for t in batch_tensors(other)}
        assert len(blocks) == 2  # uint8 frames; float32 rates and sizes
    if packed:
        assert max(len(b.groups) for b in multi) > 1


def test_ranks_split_the_global_plan_and_resume_on_another_world_size(demo_shards):
    table = demo_table()
    cfg = DataConfig(shards=str(demo_shards), num_workers=0)
    rows = len(open_plan(cfg, table).epoch(0, 0)) // 2
    one = take(cfg, table, 0, 1, DataState(0, 0, 0), 2 * rows)
    rank0 = take(cfg, table, 0, 2, DataState(0, 0, 0), rows)
    rank1 = take(cfg, table, 1, 2, DataState(0, 0, 0), rows)
    assert not {k for b in rank0 for k in b.keys} & {k for b in rank1 for k in b.keys}
    interleaved = [b.keys for pair in zip(rank0, rank1, strict=False) for b in pair]
    assert interleaved == [b.keys for b in one]
    # Two ranks stop after 3 steps; one rank resumes from their state: nothing repeats or is lost.
    state = DataState.from_dict(rank0[2].state_after)
    assert state == DataState.from_dict(rank1[2].state_after)
    before = [k for b in interleaved[:6] for k in b]
    after = [k for b in take(cfg, table, 0, 1, state, 2 * rows - 6) for k in b.keys]
    print(f"\nconsumed before the resize ({len(before)}): {before[:8]} ...")
    print(f"consumed after, on 1 rank ({len(after)}): {after[:8]} ...")
    assert not set(before) & set(after)
    assert before + after == [k for b in one for k in b.keys]


def test_corrupt_video_inside_a_shard_is_skipped_and_counted(demo_shards, tmp_path):
    """Garbage bytes behind valid-looking metadata: dropped from its batch, counted, not fatal."""
    source = demo_shards / "shard-000000-00.tar"
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    corrupted = set()
    with (
        tarfile.open(source) as tar_in,
        tarfile.open(broken_dir / source.name, "w") as tar_out,
    ):
        for member in tar_in:
            data = tar_in.extractfile(member).read()
            if member.name.endswith(".mp4") and len(corrupted) < 40:
                corrupted.add(member.name.split(".")[0])
                data = bytes(len(data))  # same size, all zeros
            tar_out.addfile(member, io.BytesIO(data))
    # The same bytes at the same places: the original manifest describes the broken shard too.
    (broken_dir / "manifest.parquet").write_bytes((demo_shards / "manifest.parquet").read_bytes())
    cfg = DataConfig(shards=str(broken_dir), num_workers=0)
    batches = take(cfg, demo_table(), 0, 1, DataState(0, 0, 0), 30)
    skipped = sum(b.skipped for b in batches)
    keys = {k for b in batches for k in b.keys}
    assert skipped > 0
    assert not keys & corrupted
    assert all(b.video.shape[0] == len(b.keys) > 0 for b in batches)

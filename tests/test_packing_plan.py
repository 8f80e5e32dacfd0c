"""The packing plan (data/packing.py, data/plan.py) on a small synthetic web-like manifest
(bench.data_scale's): what the packs hold, that every sample comes once an epoch on any number
of ranks, and which target shape each sample trains at."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.data_scale import build_manifest
from data.manifest import MANIFEST_NAME
from data.packing import PackingConfig, PackingTable
from data.plan import DataPlan, DataState, frames_at_fps
from model.geometry import LatentGeometry

FPS = 24.0
SAMPLES = 3000
GEOMETRY = LatentGeometry(4, 8, (1, 2, 2))
CONFIG = PackingConfig(enabled=True)  # 4096-token sequences of samples of at most 1024 tokens


def web_manifest(folder: Path) -> Path:
    """bench.data_scale's web-like mix, every 100th sample shrunk to 8 pixels wide: below one
    token, so the plan must leave it out."""
    path = build_manifest(SAMPLES, folder)
    table = pq.read_table(path)
    width = table["width"].to_numpy().copy()
    width[::100] = 8
    column = table.schema.get_field_index("width")
    pq.write_table(table.set_column(column, "width", pa.array(width, pa.int32())), path)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return web_manifest(tmp_path_factory.mktemp("web"))


def open_plan(shards: Path, **settings) -> DataPlan:
    table = PackingTable(PackingConfig(enabled=True, **settings), GEOMETRY)
    return DataPlan.open(str(shards), table, FPS)


def pack_tokens(plan: DataPlan) -> list[int]:
    """The tokens of every pack of epoch 0, read through the planned batches."""
    tokens = []
    for index in range(len(plan.epoch(0, 0))):
        planned = plan.batch(0, 0, index)
        ends = np.cumsum(planned.pack_sizes)
        assert ends[-1] == len(planned.sample_ids)
        shape_tokens = np.array([shape.tokens_per_sample for shape in planned.shapes])
        tokens += [int(pack.sum()) for pack in np.split(shape_tokens, ends[:-1])]
    return tokens


# --- packs ---------------------------------------------------------------------------------


def test_packs_stay_within_the_sequence_and_fill_it(shards):
    plan = open_plan(shards)
    tokens = pack_tokens(plan)
    assert max(tokens) <= CONFIG.sequence_tokens
    fill = sum(tokens) / (len(tokens) * CONFIG.sequence_tokens)
    assert fill >= 0.95, fill


def test_every_usable_sample_is_packed_once_an_epoch(shards):
    plan = open_plan(shards)
    usable = np.flatnonzero(np.asarray(plan.columns["bucket"]) >= 0)
    assert plan.unassigned == SAMPLES // 100 == SAMPLES - len(usable)  # the shrunk ones
    order = np.asarray(plan.epoch(0, 0).order)
    assert len(order) == len(usable)
    assert np.array_equal(np.sort(order), usable)


def test_a_dropped_last_partial_batch_is_its_packs_samples(shards):
    single = open_plan(shards)
    pack_start = np.asarray(single.epoch(0, 0).pack_start)
    packs = len(pack_start) - 1
    per_batch = next(n for n in range(2, 10) if packs % n)  # so that a partial batch is left
    batched = open_plan(shards, packs_per_rank=per_batch)
    kept_packs = packs // per_batch * per_batch
    dropped = len(single.epoch(0, 0).order) - len(batched.epoch(0, 0).order)
    # Same seed, same packs: the batched epoch is the single one cut at its last whole batch.
    assert dropped == pack_start[-1] - pack_start[kept_packs] > 0
    assert np.array_equal(batched.epoch(0, 0).order, single.epoch(0, 0).order[:-dropped])
    assert len(batched.epoch(0, 0)) == batched.batches_per_epoch == packs // per_batch


def test_the_plan_is_seeded(shards, tmp_path):
    plan = open_plan(shards)
    again = open_plan(web_manifest(tmp_path))  # the same manifest, its own plan cache
    assert plan.folder != again.folder
    first = np.array(plan.epoch(0, 0).order)
    assert np.array_equal(first, again.epoch(0, 0).order)
    assert np.array_equal(plan.epoch(0, 0).pack_start, again.epoch(0, 0).pack_start)
    assert not np.array_equal(first, plan.epoch(1, 0).order)  # another seed
    assert not np.array_equal(first, plan.epoch(0, 1).order)  # another epoch


def walk(
    plan: DataPlan, state: DataState, world: int, rows: int | None = None
) -> tuple[list[tuple[int, ...]], DataState]:
    """The batches of every rank in global order (row by row, rank by rank) from `state`, for
    `rows` rows or to the end of its epoch, and the state after them."""
    ranks = [plan.rows(state, rank, world) for rank in range(world)]
    batches, after = [], state
    while rows is None or len(batches) < rows * world:
        row = [next(rank) for rank in ranks]
        if row[0][0] != state.epoch:
            break
        assert all(row_after == row[0][2] for _, _, row_after in row)  # every rank agrees
        batches += [plan.batch(state.seed, epoch, index).sample_ids for epoch, index, _ in row]
        after = row[0][2]
    return batches, after


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 4), (4, 1), (4, 2)])
def test_rows_resume_on_another_world_size_in_the_same_order(shards, before, after):
    plan = open_plan(shards, packs_per_rank=2)
    start = DataState(0, 0, 0)
    everything, end = walk(plan, start, 1)
    assert end == DataState(0, 1, 0)
    first, resumed = walk(plan, start, before, rows=5)
    assert resumed.consumed_samples == sum(len(batch) for batch in first)
    rest, end = walk(plan, resumed, after)
    assert end == DataState(0, 1, 0)
    batches = first + rest
    assert batches == everything[: len(batches)]  # none twice, none skipped, same order
    assert len(everything) - len(batches) < after  # the epoch ends with fewer than `after` left
    samples = [i for batch in batches for i in batch]
    assert len(set(samples)) == len(samples)


# --- targets -------------------------------------------------------------------------------


def manifest_sizes(shards: Path) -> list[tuple[int, int, int]]:
    """The distinct (width, height, frames at FPS) of the manifest's samples."""
    table = pq.read_table(shards / MANIFEST_NAME, columns=["width", "height", "frames", "fps"])
    available = frames_at_fps(table["frames"].to_numpy(), table["fps"].to_numpy(), FPS)
    sizes = pa.table({"w": table["width"], "h": table["height"], "f": pa.array(available)})
    distinct = sizes.group_by(["w", "h", "f"]).aggregate([])
    return list(zip(*(distinct[n].to_pylist() for n in ("w", "h", "f")), strict=True))


# Screen and phone sizes up to 21:9 and 9:21 (a panorama: below), and odd ones.
OTHER_SIZES = [
    (w, h, f)
    for w, h in [
        (2560, 1080),
        (1080, 2520),
        (1920, 800),
        (1080, 1350),
        (4096, 2160),
        (1440, 1080),
        (256, 256),
        (100, 37),
        (33, 33),
        (15, 400),
    ]
    for f in (1, 3, 17, 49, 121, 500)
]


def aspect_change(width: float, height: float, aspect: float) -> float:
    return abs(math.log(width / height / aspect))


def grid_keeps_aspect(table: PackingTable, width: int, height: int, frames: int) -> bool:
    """Whether any token grid no larger than the sample, within the per-sample cap, is within
    packing.max_aspect_change of the sample's aspect (then its target must be too)."""
    token_frames = table.token_frames(min(frames, table.max_frames))
    area = table.cfg.max_tokens_per_sample // token_frames
    rows = np.arange(1, height // table.height_unit + 1)
    # Columns c of `rows` r whose pixel aspect (c * width_unit) / (r * height_unit) is close.
    columns = rows * (width / height) * (table.height_unit / table.width_unit)
    change = math.exp(table.cfg.max_aspect_change) * (1 + 1e-12)
    fewest = np.maximum(1, np.ceil(columns / change))
    most = np.minimum(
        np.floor(columns * change), np.minimum(width // table.width_unit, area // rows)
    )
    return bool((fewest <= most).any())


@pytest.mark.parametrize(
    ("settings", "geometry"),
    [
        ({}, GEOMETRY),
        ({"sequence_tokens": 111600, "max_tokens_per_sample": 111600, "max_frames": 385}, GEOMETRY),
        ({"sequence_tokens": 480, "max_tokens_per_sample": 240, "max_frames": 17}, GEOMETRY),
        ({}, LatentGeometry(4, 8, (2, 2, 2))),
    ],
    ids=["default", "sora_like", "demo", "temporal_patch_2"],
)
def test_targets_scale_down_whole_grids_and_keep_aspect(shards, settings, geometry):
    table = PackingTable(PackingConfig(enabled=True, **settings), geometry)
    cap, max_change = table.cfg.max_tokens_per_sample, table.cfg.max_aspect_change
    for width, height, frames in manifest_sizes(shards) + OTHER_SIZES:
        target = table.target(width, height, frames)
        token_frames = table.token_frames(min(frames, table.max_frames))
        if target is None:  # too small for one token
            assert min(width // table.width_unit, height // table.height_unit, token_frames) < 1
            continue
        target_frames, target_height, target_width = target
        assert target_height <= height and target_width <= width  # never upscaled
        # The longest whole clip within the frames it has and may keep.
        longest = min(frames, table.max_frames)
        clip = geometry.temporal_compression * geometry.patch[0]
        assert target_frames <= longest < target_frames + clip
        # Whole latents and patches: LatentGeometry.tokens refuses anything else.
        tokens = geometry.tokens(*target)
        assert tokens == table.bucket(*target).tokens_per_sample <= cap
        if grid_keeps_aspect(table, width, height, frames):
            change = aspect_change(target_width, target_height, width / height)
            assert change <= max_change + 1e-9, (width, height, frames, target)


def test_images_are_one_frame_targets(shards):
    table = PackingTable(CONFIG, GEOMETRY)
    targets = [table.target(*size) for size in manifest_sizes(shards) if size[2] == 1]
    shapes = [target for target in targets if target is not None]  # not the shrunk ones
    assert shapes and all(frames == 1 for frames, _, _ in shapes)


def test_the_plan_gives_each_sample_its_target(shards):
    plan = open_plan(shards)
    table = plan.packing
    columns = {name: np.asarray(plan.columns[name]) for name in ("width", "height", "frames")}
    available = frames_at_fps(columns["frames"], np.asarray(plan.columns["fps"]), FPS)
    for sample in range(0, SAMPLES, 7):
        target = table.target(
            int(columns["width"][sample]), int(columns["height"][sample]), int(available[sample])
        )
        index = int(plan.columns["bucket"][sample])
        assert (None if index < 0 else plan.buckets[index].shape) == target


def test_a_wide_panorama_keeps_its_aspect():
    table = PackingTable(CONFIG, GEOMETRY)
    assert grid_keeps_aspect(table, 4000, 500, 121)
    _, height, width = table.target(4000, 500, 121)
    assert aspect_change(width, height, 8.0) <= CONFIG.max_aspect_change


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "patch", "key"),
    [
        (
            {"sequence_tokens": 1024, "max_tokens_per_sample": 1025},
            (1, 2, 2),
            "max_tokens_per_sample",
        ),
        ({"max_frames": 0}, (1, 2, 2), "max_frames"),
        ({"max_frames": 4}, (2, 2, 2), "max_frames"),  # 1 latent frame: no temporal patch
        ({"max_frames": 385, "max_tokens_per_sample": 96}, (1, 2, 2), "max_tokens_per_sample"),
    ],
)
def test_settings_that_cannot_pack_name_their_key(settings, patch, key):
    with pytest.raises(ValueError, match=rf"packing\.{key}="):
        PackingTable(PackingConfig(enabled=True, **settings), LatentGeometry(4, 8, patch))


def test_the_least_settings_that_can_pack_are_accepted():
    # 385 frames are 97 latent frames: one token each.
    PackingTable(PackingConfig(max_frames=385, max_tokens_per_sample=97), GEOMETRY)
    PackingTable(PackingConfig(max_frames=5, sequence_tokens=1024), LatentGeometry(4, 8, (2, 2, 2)))
    PackingTable(PackingConfig(sequence_tokens=1024, max_tokens_per_sample=1024), GEOMETRY)

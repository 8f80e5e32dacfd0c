"""Streaming shards from object storage (moto's S3 and a plain HTTP server on 127.0.0.1), checked
from the servers' own request logs:

- the tiny DiT trains on 2 ranks from s3:// and http:// shards; every GET of a tar is one Range
  request for exactly one manifest span, the bytes served are those spans, which hold every
  consumed sample and beyond them only the read-ahead of the next planned batches;
- a run stopped at step 3 on 2 ranks and resumed on 1, from S3, consumes the keys of a 1-rank
  run on the local shards, none twice, none skipped;
- a server answering 30% of its GETs with 503: reads are retried, the samples that fail twice
  are skipped and counted, the run finishes; a server that goes away mid-run stops the run naming
  its URL, and the checkpoints already written stay complete and latest;
- a missing shard or manifest fails naming the URL, credentials in URLs are refused, a server
  ignoring Range fails without retries, the disk cache serves a second pass and stays within its
  budget, and a foreign remote folder without a manifest is indexed into the same samples.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from launching import ROOT, metrics, process_env, run_checked, torchrun_command
from object_store import BUCKET, HttpServer, S3Server, copy_shards

from data.buckets import BucketTable
from data.pipeline import build_loader, open_plan
from data.plan import DataPlan, DataState
from data.prepare import load_config, prepare
from data.reader import SampleReader
from data.storage import RangeReader, RangeUnsupported, ReadError, RemoteError, RetryPolicy
from model.geometry import LatentGeometry
from train.checkpoint import _verify_manifest
from train.config import register_configs, to_config

register_configs()
READ_AHEAD = 4
STEPS = 3
FSDP = ("parallel=fsdp", "train.checkpoint_every=3")


@pytest.fixture(scope="module")
def shards(demo_shards, tmp_path_factory) -> Path:
    """The demo samples re-packed into shards of about 1 MiB, with their manifest."""
    clips = demo_shards.parent / "clips"
    out = tmp_path_factory.mktemp("remote") / "shards"
    prepare(
        str(clips / "captions.csv"), out, load_config(["shard_size_mb=1"]), "inline", progress=False
    )
    return copy_shards(out, out.parent / "served")  # without the local plan cache beside it


@pytest.fixture(scope="module")
def manifest(shards) -> dict[tuple[str, int, int], str]:
    """(shard file name, first byte, last byte) of every sample's span -> its key."""
    rows = pq.read_table(shards / "manifest.parquet").to_pylist()
    return {(r["shard"], r["offset"], r["offset"] + r["size"] - 1): r["key"] for r in rows}


@pytest.fixture(scope="module")
def s3(shards, monkeypatch_module):
    server = S3Server()
    for name, value in server.env.items():
        monkeypatch_module.setenv(name, value)
    server.upload(shards, "shards")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def config(*values: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_config(compose("config", overrides=list(values)))


@pytest.fixture(scope="module")
def local_plan(shards, tmp_path_factory) -> DataPlan:
    """The training runs' plan, on the local shards (the tiny VAE compresses 4x in time and 8x in
    space)."""
    cfg = config()
    table = BucketTable(cfg.buckets, LatentGeometry(4, 8, tuple(cfg.model.patch_size)))
    return DataPlan.open(str(shards), table, cfg.data.fps, None, tmp_path_factory.mktemp("plans"))


def planned_keys(plan: DataPlan, rank: int, world: int, batches: int) -> list[list[str]]:
    """The keys of this rank's first `batches` batches of the plan, batch by batch."""
    out = []
    for epoch, index, _ in plan.rows(DataState(0, 0, 0), rank, world):
        if len(out) == batches:
            return out
        out.append([plan.key(i) for i in plan.batch(0, epoch, index).sample_ids])
    raise AssertionError("unreachable")


def overrides(shards: str | Path, run_dir: Path, *extra: str) -> list[str]:
    values = {
        "data.shards": shards,
        "train.run_dir": run_dir,
        "train.steps": STEPS,
        "train.log_every": 1,
        "train.checkpoint_every": STEPS,
        "train.keep_last": 10,
        "train.sample_prompts": "[]",
        "train.record_samples": "true",
        "optim.warmup_steps": 1,
        "logger": "none",
        "parallel": "ddp",
        "data.num_workers": 0,
        "data.read_ahead": READ_AHEAD,
        "data.cache_dir": run_dir / "data-cache",
    }
    values |= dict(item.split("=", 1) for item in extra)
    return [f"{key}={value}" for key, value in values.items()]


def train(*args: str, nproc: int = 2, env: dict | None = None, timeout: int = 300):
    command = (
        torchrun_command("-m", "train", *args, nproc=nproc)
        if nproc > 1
        else [sys.executable, "-m", "train", *args]
    )
    return run_checked(command, timeout, **(env or {}))


def consumed(run_dir: Path, up_to: int = 10**9, after: int = 0) -> dict[int, list[list[str]]]:
    """Per rank, the keys of each step in (after, up_to]."""
    out = {}
    for path in sorted((run_dir / "consumed").glob("rank*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        out[int(path.stem[4:])] = [r["keys"] for r in records if after < r["step"] <= up_to]
    return out


def in_order(by_rank: dict[int, list[list[str]]]) -> list[str]:
    """The keys in global plan order: step by step, rank 0's batch first."""
    steps = len(next(iter(by_rank.values())))
    return [k for step in range(steps) for rank in sorted(by_rank) for k in by_rank[rank][step]]


def tar_gets(server) -> list:
    server.log.wait_idle()
    return server.log.requests(".tar", "GET")


def requested_spans(gets, manifest) -> Counter:
    """Each tar GET as a manifest span, counted; fails on any other kind of GET of a tar."""
    spans = Counter()
    for get in gets:
        assert get.range is not None, f"a GET of a whole shard: {get}"
        span = (get.path.rsplit("/", 1)[1], *get.range)
        assert span in manifest, f"a range that is no sample's span: {get}"
        spans[span] += 1
    return spans


# --- 1. training from s3:// and http:// -------------------------------------------------------


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory) -> tuple[Path, list]:
    """3 steps of FSDP on 2 ranks from S3 (checkpointed at 3), and the tar GETs it made."""
    run_dir = tmp_path_factory.mktemp("s3_run")
    s3.log.clear()
    train(*overrides(f"s3://{BUCKET}/shards", run_dir, *FSDP), env=s3.env)
    return run_dir, tar_gets(s3)


@pytest.mark.multiprocess
@pytest.mark.parametrize("store", ["s3", "http"])
def test_trains_two_ranks_reading_exactly_the_sample_spans(
    store, s3, shards, manifest, local_plan, tmp_path, request
):
    workers = 0 if store == "s3" else 1  # http: the reads come from a forked loader worker
    if store == "s3":
        run_dir, gets = request.getfixturevalue("s3_run")
    else:
        server, run_dir = HttpServer(shards), tmp_path
        try:
            train(*overrides(f"{server.url}/", run_dir, "data.num_workers=1"))
            gets = tar_gets(server)
        finally:
            server.stop()
    spans = requested_spans(gets, manifest)
    assert gets and all(g.status == 206 for g in gets)
    served = sum(g.sent for g in gets)
    requested = sum((last - first + 1) * n for (_, first, last), n in spans.items())
    read = Counter()  # key -> times its span was fetched
    for span, n in spans.items():
        read[manifest[span]] += n
    eaten = consumed(run_dir)
    assert [len(steps) for steps in eaten.values()] == [STEPS, STEPS]
    eaten_keys = Counter(k for steps in eaten.values() for batch in steps for k in batch)
    # Beyond the consumed batches, only samples of each rank's next planned batches: those its
    # reader asked for (read_ahead reads past the batch it last yielded) after the batches
    # trained on and the DataLoader's prefetch (4 batches a worker). With the prefetch, the
    # plan runs into the next epoch, whose samples are read again.
    prefetch = 4 * workers
    allowed, bound = Counter(), 0
    for rank in (0, 1):
        plan = planned_keys(local_plan, rank, 2, STEPS + prefetch + 8)
        assert plan[:STEPS] == eaten[rank]  # no sample skipped, none repeated
        allowed.update(k for batch in plan[: STEPS + prefetch] for k in batch)
        ahead = 0
        for batch in plan[STEPS + prefetch :]:
            allowed.update(batch)
            ahead += len(batch)
            if ahead >= READ_AHEAD:
                break
        bound += ahead + sum(len(batch) for batch in plan[STEPS : STEPS + prefetch])
    extra = read - eaten_keys
    consumed_bytes = sum(
        (last - first + 1) * eaten_keys[key] for (_, first, last), key in manifest.items()
    )
    print(
        f"\n{store}: {len(gets)} ranged GETs of tars (none whole), {served} bytes served = "
        f"{requested} bytes of requested spans; consumed {eaten_keys.total()} samples "
        f"({consumed_bytes} bytes), {extra.total()} more read ahead (at most {bound})"
    )
    assert served == requested
    assert not eaten_keys - read  # every consumed sample came from these ranges
    assert not read - allowed and extra.total() <= bound


# --- 2. exact resume from remote shards ------------------------------------------------------


@pytest.mark.multiprocess
def test_remote_run_stopped_on_2_ranks_resumes_on_1_with_the_local_runs_keys(
    s3, s3_run, shards, tmp_path
):
    first, _ = s3_run  # 2 ranks, steps 1-3, checkpointed at 3
    reference, second = tmp_path / "reference", tmp_path / "second"
    train(*overrides(shards, reference, *FSDP, "train.steps=8"), nproc=1)
    name = "step_00000003"
    shutil.copytree(first / "checkpoints" / name, second / "checkpoints" / name)
    url = f"s3://{BUCKET}/shards"
    result = train(*overrides(url, second, *FSDP, "train.steps=5"), nproc=1, env=s3.env)
    assert "resumed from step 3" in result.stdout + result.stderr
    before, after = in_order(consumed(first)), in_order(consumed(second, after=3))
    expected = in_order(consumed(reference))
    print(
        f"\n2 ranks steps 1-3 from S3 + 1 rank steps 4-5 from S3: {len(before)} + {len(after)} "
        f"keys; the local 1-rank run's 8 steps: {len(expected)} keys"
    )
    assert len(set(before + after)) == len(before + after)  # none twice
    assert before + after == expected  # none skipped, in the plan's order


# --- 3. a flaky server, and one that goes away -----------------------------------------------


@pytest.mark.multiprocess
def test_flaky_server_reads_are_retried_and_failures_skipped(
    shards, manifest, local_plan, tmp_path
):
    server = HttpServer(shards, fail_share=0.3, seed=1)
    try:
        train(
            *overrides(
                f"{server.url}/",
                tmp_path,
                "train.steps=4",
                "data.read_retries=1",
                "data.read_backoff_s=0.01",
            ),
            nproc=1,
        )
        gets = tar_gets(server)
    finally:
        server.stop()
    spans = requested_spans(gets, manifest)
    ok = {manifest[(g.path.rsplit("/", 1)[1], *g.range)] for g in gets if g.status == 206}
    failed = sum(g.status == 503 for g in gets)
    lines = metrics(tmp_path)
    skipped = sum(line["data/skipped_samples"] for line in lines)
    eaten = consumed(tmp_path)
    missing = set()
    for rank in (0,):
        plan = planned_keys(local_plan, rank, 1, 4)
        for planned, got in zip(plan, eaten[rank], strict=True):
            assert got == [k for k in planned if k in ok]  # what was served, in order
            missing |= set(planned) - set(got)
    retried = sum(count == 2 for count in spans.values())
    print(
        f"\n503 to {failed} of {len(gets)} tar GETs; {retried} spans asked twice; "
        f"{len(missing)} consumed-batch samples never served; skipped_samples {skipped}"
    )
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert max(spans.values()) == 2 and retried > 0  # one retry a read, no more
    # Retries reach the metrics (reads ahead of step 4 may be in no logged batch yet).
    assert 0 < sum(line["data/retries"] for line in lines) <= retried
    assert all(spans[s] == 2 for s in spans if manifest[s] in missing)
    assert skipped == len(missing) > 0


def test_what_asking_again_cannot_heal_fails_at_once(shards, manifest):
    server = HttpServer(shards)
    (name, first, last), _ = next(iter(manifest.items()))
    reader = RangeReader(retries=3, backoff_s=0.5)
    try:
        start = time.monotonic()
        with pytest.raises(ReadError, match=r"gone\.tar .*404 .*after 1 attempts"):
            reader.read(f"{server.url}/gone.tar", first, last - first + 1)
        elapsed = time.monotonic() - start
        assert len(server.log.wait_for(1, ".tar")) == 1  # asked once
    finally:
        server.stop()
    print(f"\na missing object failed in {elapsed:.3f} s")
    assert elapsed < 0.5 and reader.take_retry_counts() == (0, 0.0)


def test_a_burst_of_503s_is_survived_and_counted(shards, manifest):
    server = HttpServer(shards, fail_first=3)
    (name, first, last), _ = next(iter(manifest.items()))
    reader = RangeReader(retries=3, backoff_s=0.01)
    try:
        data = reader.read(f"{server.url}/{name}", first, last - first + 1)
        statuses = [r.status for r in server.log.wait_for(4, ".tar")]
    finally:
        server.stop()
    assert data == (shards / name).read_bytes()[first : last + 1]
    assert statuses == [503, 503, 503, 206]
    retries, waited_s = reader.take_retry_counts()
    # Throttling waits up to 4x longer: at most 4 x 0.01 x (1 + 2 + 4) seconds in all.
    assert retries == 3 and 0 < waited_s <= 4 * 0.01 * 7


def test_retry_waits_are_jittered_from_the_readers_seed():
    throttled, failed = RemoteError("s3://b/k: 503 SlowDown", 503), OSError("connection reset")

    def waits(seed: int, error: Exception) -> list[float | None]:
        policy = RetryPolicy(retries=4, backoff_s=1.0, seed=seed)
        return [policy.wait_s(attempt, error) for attempt in range(5)]

    assert waits(7, failed) == waits(7, failed)  # replayable
    assert waits(7, failed) != waits(8, failed)  # readers failing together spread out
    assert waits(7, failed)[-1] is None  # out of retries
    assert all(0 <= w <= 2**a for a, w in enumerate(waits(7, failed)[:-1]))
    assert all(0 <= w <= 4 * 2**a for a, w in enumerate(waits(7, throttled)[:-1]))
    assert sum(waits(3, throttled)[:-1]) > sum(waits(3, failed)[:-1])  # same draws, longer
    policy = RetryPolicy(retries=4, backoff_s=1.0)
    for never in (
        FileNotFoundError("gone"),
        PermissionError("no"),
        RemoteError("s3://b/k: 403 AccessDenied", 403),
        RemoteError("s3://b/k: 400 BadRequest", 400),
        RangeUnsupported("no ranges"),
    ):
        assert policy.wait_s(0, never) is None, never


@pytest.mark.multiprocess
def test_server_going_away_stops_the_run_naming_it_and_keeps_checkpoints(shards, tmp_path):
    server = HttpServer(shards)
    args = overrides(
        f"{server.url}/",
        tmp_path,
        "train.steps=200",
        "train.checkpoint_every=2",
        "data.read_retries=1",
        "data.read_backoff_s=0.01",
        "data.max_failed_reads=4",
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "checkpoints" / "step_00000004").exists():
            assert agent.poll() is None and time.monotonic() < deadline, "no checkpoint at 4"
            time.sleep(0.1)
        server.stop()
        output = agent.communicate(timeout=180)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0
    error = next(line for line in output.splitlines() if "in a row could not be read" in line)
    print(f"\nstopped at step {metrics(tmp_path)[-1]['step']}: {error.strip()[:400]}")
    assert f"{server.url}/shard-" in error
    checkpoints = tmp_path / "checkpoints"
    saved = sorted(p.name for p in checkpoints.glob("step_*"))
    latest = (checkpoints / "latest").read_text()
    assert latest == saved[-1] and latest >= "step_00000004"
    for name in saved:
        _verify_manifest(checkpoints / name)  # each one complete
    assert not list(checkpoints.glob(".tmp_*"))


# --- 4. smaller checks -----------------------------------------------------------------------


def test_missing_shard_fails_before_training_naming_its_url(s3, shards, local_plan, tmp_path):
    first, second, *rest = sorted(p.name for p in shards.glob("*.tar"))
    url = s3.upload(shards, "incomplete", ["manifest.parquet", first, *rest])  # not the second
    cfg = replace(config().data, shards=url, cache_dir=str(tmp_path), num_workers=0)
    plan = open_plan(cfg, local_plan.table)
    with pytest.raises(FileNotFoundError) as error:
        build_loader(cfg, plan, 0, 1, DataState(0, 0, 0))  # as the trainer starts
    print(f"\n{error.value}")
    assert str(error.value) == f"1 shards of the manifest are missing: {url}/{second}"


def test_missing_manifest_and_credentials_in_urls_fail_naming_the_url(s3, shards, tmp_path):
    table = BucketTable(config().buckets, LatentGeometry(4, 8, (1, 2, 2)))
    url = s3.upload(shards, "no-manifest", [next(shards.glob("*.tar")).name])
    with pytest.raises(FileNotFoundError, match=f"no manifest {url}/manifest.parquet"):
        DataPlan.open(url, table, 8.0, None, tmp_path)
    for secret in ("s3://AKIA:hunter2@bucket/shards", "http://user:hunter2@127.0.0.1:1/x/"):
        with pytest.raises(ValueError, match="carries credentials") as error:
            DataPlan.open(secret, table, 8.0, None, tmp_path)
        assert "hunter2" not in str(error.value)


def test_server_ignoring_range_fails_at_once(shards, manifest):
    server = HttpServer(shards)
    server.ranges = False
    (name, first, last), _ = next(iter(manifest.items()))
    try:
        with pytest.raises(ReadError, match="does not serve byte ranges"):
            RangeReader(retries=3, backoff_s=0.01).read(
                f"{server.url}/{name}", first, last - first + 1
            )
        server.log.wait_idle()
        assert len(server.log.requests(".tar")) == 1  # no retries
    finally:
        server.stop()


def test_disk_cache_serves_a_second_pass_within_its_budget(s3, shards, local_plan, tmp_path):
    url = f"s3://{BUCKET}/shards"
    table = local_plan.table
    plan = DataPlan.open(url, table, 8.0, None, tmp_path)
    ids = range(plan.num_samples)
    big = SampleReader(plan, 0, 0.01, tmp_path / "big", cache_mb=8)
    s3.log.clear()
    first = [big.read(i).media for i in ids]
    served_once = sum(g.sent for g in tar_gets(s3))
    second = [big.read(i).media for i in ids]
    served_twice = sum(g.sent for g in tar_gets(s3))
    folder = tmp_path / "big" / "samples"
    cached = sum(p.stat().st_size for p in folder.iterdir())
    print(
        f"\n{plan.num_samples} samples: {served_once} bytes served by the first pass, "
        f"{served_twice - served_once} by the second; {cached} bytes cached"
    )
    assert first == second and served_twice == served_once
    assert cached == served_once <= 8 * 2**20
    # A budget of 1 MiB, smaller than the data: the folder stays within budget + 1/16 of it.
    small = SampleReader(plan, 0, 0.01, tmp_path / "small", cache_mb=1)
    for i in ids:
        small.read(i)
    held = sum(p.stat().st_size for p in (tmp_path / "small" / "samples").iterdir())
    print(f"1 MiB budget: {held} bytes held after a pass over {served_once}")
    assert 0 < held <= 2**20 * 17 // 16


def test_foreign_remote_folder_is_indexed_into_the_same_samples(s3, shards, local_plan, tmp_path):
    tars = sorted(p.name for p in shards.glob("*.tar"))
    url = s3.upload(shards, "foreign", tars)
    result = run_checked(
        [sys.executable, "-m", "data.manifest", "index", f"{url}/", "--workers", "2"], 300, **s3.env
    )
    print(f"\n{result.stdout.strip()}")
    plan = DataPlan.open(url, local_plan.table, 8.0, None, tmp_path)
    assert plan.num_samples == local_plan.num_samples
    assert [url + "/" + Path(s).name for s in local_plan.shards] == plan.shards
    for name in ("offset", "size", "frames", "width", "height"):
        assert (plan.columns[name] == local_plan.columns[name]).all()
    assert planned_keys(plan, 0, 1, 6) == planned_keys(local_plan, 0, 1, 6)
    remote, local = SampleReader(plan, 0), SampleReader(local_plan, 0)
    for i in range(0, plan.num_samples, 40):
        assert remote.read(i).media == local.read(i).media

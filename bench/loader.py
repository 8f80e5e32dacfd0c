"""The loader's clips/s on real shards, from local disk and from an S3 server, against decoding.

    python -m bench.loader [--workers 2] [--batches 60] [--warmup 6]

Builds the demo shards once (`data.demo.build_demo` under `.cache/bench/demo`), then times the
same planned batches (dp_rank 0 of 1, epoch 0 from the start, the demo bucket table, data.fps=8,
augmentation on) three ways, each with the same number of DataLoader workers:

- `decode_bound`: the batches' samples read into memory first, then decoded by `--workers`
  DataLoader workers with `data.decode.decode_clip` exactly as BatchStream decodes them (same
  rows per worker, same seeded clip starts and crops, stacked into a batch tensor). No reading:
  the best the loader can do on these CPUs.
- `local`: `data.pipeline.build_loader` over the shard folder on local disk.
- `s3`: `build_loader` over `s3://tessera-bench/demo/` on a moto S3 server started here on
  127.0.0.1 in its own process (fake credentials, `AWS_ENDPOINT_URL`), the tars and
  manifest.parquet uploaded with boto3. The server shares the 2 CPUs with the workers, so this
  also pays for the server's own CPU, which a real store would not charge: `s3_server_cpu_cores`
  is the share of a core the server used during the S3 run, `s3_machine_busy_cores` the cores
  the whole machine was busy (everyone's processes) meanwhile, of `os.cpu_count()`.
- `s3_read`: what one ranged read costs, apart from decoding: every sample of the plan read once
  through `data.storage.RangeReader` by 16 threads of this process (as a loader worker's
  read-ahead does), with the CPU ms per read of this process and of the server, and reads/s.

The first `--warmup` batches of each (worker start-up, first reads) are not timed. Prints a table
and one JSON line with clips/s and the ratios to the bound (targets: >= 0.9 local, >= 0.8 S3).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.buckets import BucketConfig, BucketTable
from data.decode import decode_clip
from data.demo import build_demo
from data.pipeline import DataConfig, build_loader, open_plan
from data.plan import DataPlan, DataState
from data.reader import SampleReader
from data.storage import RangeReader
from model.geometry import LatentGeometry

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
BUCKET = "tessera-bench"


def demo_table() -> BucketTable:
    values = OmegaConf.merge(
        OmegaConf.structured(BucketConfig), OmegaConf.load(ROOT / "conf/buckets/demo.yaml")
    )
    return BucketTable(OmegaConf.to_object(values), LatentGeometry(4, 8, (1, 2, 2)))


def config(shards: str, workers: int) -> DataConfig:
    return DataConfig(shards=shards, fps=8.0, num_workers=workers, cache_dir=str(CACHE / "data"))


class DecodeOnly(IterableDataset):
    """The planned batches of `rows`, decoded from bytes already in memory, split over workers
    as BatchStream splits rows."""

    def __init__(self, cfg: DataConfig, plan: DataPlan, rows: list, media: dict[int, bytes]):
        self.cfg, self.plan, self.rows, self.media = cfg, plan, rows, media

    def __iter__(self):
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        columns = self.plan.columns
        for row, (epoch, index, _after) in enumerate(self.rows):
            if row % workers != worker_id:
                continue
            planned = self.plan.batch(self.cfg.seed, epoch, index)
            bucket, clips = planned.bucket, []
            for sample_id in planned.sample_ids:
                rng = np.random.default_rng([self.cfg.seed, epoch, sample_id])
                clips.append(
                    decode_clip(
                        self.media[sample_id],
                        self.plan.media(sample_id),
                        bucket.frames,
                        self.cfg.fps,
                        (bucket.height, bucket.width),
                        (int(columns["height"][sample_id]), int(columns["width"][sample_id])),
                        rng,
                        self.plan.key(sample_id),
                    )
                )
            yield torch.from_numpy(np.stack(clips))


def timed(batches, count: int, warmup: int) -> tuple[float, int]:
    """(clips/s, clips) over `count` batches after `warmup` untimed ones."""
    clips, started = 0, None
    for i, batch in enumerate(batches):
        if i == warmup:
            started = time.perf_counter()
        if i >= warmup:
            clips += len(batch.keys) if hasattr(batch, "keys") else len(batch)
        if i + 1 == warmup + count:
            break
    return clips / (time.perf_counter() - started), clips


def loader_rate(shards: str, table: BucketTable, workers: int, count: int, warmup: int):
    cfg = config(shards, workers)
    plan = open_plan(cfg, table)
    stream = build_loader(cfg, plan, 0, 1, DataState(cfg.seed, 0, 0))
    try:
        return timed(stream, count, warmup)
    finally:
        del stream  # the DataLoader's workers exit with its iterator


def decode_rate(shards: str, table: BucketTable, workers: int, count: int, warmup: int):
    cfg = config(shards, workers)
    plan = open_plan(cfg, table)
    rows = []
    for row in plan.rows(DataState(cfg.seed, 0, 0), 0, 1):
        rows.append(row)
        if len(rows) == warmup + count:
            break
    reader = SampleReader(plan)
    media = {
        i: reader.read(i).media
        for epoch, index, _ in rows
        for i in plan.batch(cfg.seed, epoch, index).sample_ids
    }
    dataset = DecodeOnly(cfg, plan, rows, media)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4)
    return timed(iter(loader), count, warmup)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(shards: Path) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on 127.0.0.1 holding the shards; (its process, the shard URL)."""
    port = free_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import boto3

    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.time() > deadline:
                server.kill()
                raise
            time.sleep(0.2)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(shards.iterdir()):
        if path.suffix in (".tar", ".parquet"):
            client.upload_file(str(path), BUCKET, f"demo/{path.name}")
    return server, f"s3://{BUCKET}/demo/"


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_cost(url: str, table: BucketTable, server: int, threads: int = 16) -> dict:
    """CPU ms per ranged read, of this process (the client) and of the server, and reads/s:
    each sample of the plan once, `threads` reads at a time."""
    plan = open_plan(config(url, 0), table)
    columns, reader = plan.columns, RangeReader()
    spans = [
        (plan.shard(i), int(columns["offset"][i]), int(columns["size"][i]))
        for i in range(plan.num_samples)
    ]
    reader.read(*spans[0])  # the client and its first connection
    with ThreadPoolExecutor(threads) as pool:
        client, server_cpu, wall = time.process_time(), cpu_seconds(server), time.perf_counter()
        list(pool.map(lambda span: reader.read(*span), spans))
        wall = time.perf_counter() - wall
    return {
        "reads": len(spans),
        "client_cpu_ms": round((time.process_time() - client) / len(spans) * 1e3, 2),
        "server_cpu_ms": round((cpu_seconds(server) - server_cpu) / len(spans) * 1e3, 2),
        "reads_s": round(len(spans) / wall, 1),
    }


def machine_busy() -> float:
    """CPU seconds all processes of the machine have used (every core, anyone's jobs too)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=60, help="timed batches of each")
    parser.add_argument("--warmup", type=int, default=6, help="untimed batches first")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = build_demo(CACHE / "demo")
    table = demo_table()
    load_before = os.getloadavg()[0]
    run = (args.workers, args.batches, args.warmup)
    bound, clips = decode_rate(str(shards), table, *run)
    local, _ = loader_rate(str(shards), table, *run)
    server, url = start_s3(shards)
    try:
        cpu_before, busy, started = cpu_seconds(server.pid), machine_busy(), time.perf_counter()
        s3, _ = loader_rate(url, table, *run)
        elapsed = time.perf_counter() - started
        server_cpu = (cpu_seconds(server.pid) - cpu_before) / elapsed
        busy = (machine_busy() - busy) / elapsed
        read = read_cost(url, table, server.pid)
    finally:
        server.kill()
        server.wait()
    result = {
        "workers": args.workers,
        "batches": args.batches,
        "clips": clips,
        "decode_bound_clips_s": round(bound, 1),
        "local_clips_s": round(local, 1),
        "s3_clips_s": round(s3, 1),
        "local_ratio": round(local / bound, 3),
        "s3_ratio": round(s3 / bound, 3),
        "s3_server_cpu_cores": round(server_cpu, 2),
        "s3_machine_busy_cores": round(busy, 2),
        "s3_read": read,
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print("| source | clips/s | vs decode-only |")
    print("|---|---|---|")
    print(f"| decode only (bytes in memory) | {bound:.1f} | 1.00 |")
    print(f"| local disk | {local:.1f} | {local / bound:.2f} |")
    print(f"| S3 (moto on 127.0.0.1) | {s3:.1f} | {s3 / bound:.2f} |")
    print(
        f"S3 ranged read: {read['client_cpu_ms']} ms client CPU, {read['server_cpu_ms']} ms "
        f"server CPU, {read['reads_s']} reads/s ({read['reads']} reads, 16 threads)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

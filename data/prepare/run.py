"""Running the stages over the chunks: on Ray Data (an embedded local Ray, or a cluster), or
inline in this process (the benchmark's baseline and the demo's builder).

Ray Data streams the chunks through the stages: cutting and packing as tasks on every CPU
of the cluster, aesthetic scoring and recaptioning as actors that hold their model (one per
GPU, or one on CPU). Only the chunks' small records come back to this process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from data.prepare.clips import cut_file
from data.prepare.config import PrepareConfig, fingerprint
from data.prepare.pack import WORK_DIR, chunk_record, finalize, pack_chunk
from data.prepare.source import chunk_files, list_source, listing_digest
from data.storage import write_atomic

WORKER_MEMORY = 384 * 2**20  # a cutting worker's resident set before its chunk (measured ~280 MiB)
CHUNK_MEMORY_FACTOR = 4


def prepare(
    source: str,
    out: str | Path,
    cfg: PrepareConfig,
    runner: str = "ray",
    address: str | None = None,
    progress: bool = True,
) -> dict:
    """Turn `source` into shards, `manifest.parquet` and `report.json` in `out`, resuming the
    work a previous run on `out` left; returns the report."""
    if runner not in ("ray", "inline"):
        raise ValueError(f"runner={runner!r}: use 'ray' or 'inline'")
    out = writable_output(Path(out))
    rows = list_source(str(source))
    chunks = chunk_files(rows, cfg.seed, int(cfg.shard_size_mb * 2**20))
    claim(out, {"listing": listing_digest(rows), "chunks": len(chunks), "config": fingerprint(cfg)})
    works = [
        {"chunk": i, "files": files}
        for i, files in enumerate(chunks)
        if not chunk_record(out, i).exists()
    ]
    done = len(rows) - sum(len(work["files"]) for work in works)
    run = run_ray if runner == "ray" else run_inline
    with Progress(len(rows), done, progress) as bar:
        for record in run(works, str(out), cfg, address):
            bar.update(record)
    report = finalize(out, len(chunks), str(source))
    if progress:
        print(summary(report, out))
    return report


def writable_output(out: Path) -> Path:
    try:
        (out / WORK_DIR / "chunks").mkdir(parents=True, exist_ok=True)
        probe = out / WORK_DIR / f"write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"output folder {out} is not writable: {error}") from error
    for stale in out.glob("*.tmp"):  # what a killed run was writing
        stale.unlink()
    return out


def claim(out: Path, job: dict) -> None:
    """Record what this folder is made from; a rerun must be the same job to resume it."""
    path = out / WORK_DIR / "job.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != job:
            changed = sorted(key for key in job if job[key] != previous.get(key))
            raise ValueError(
                f"{out} holds the work of another source or config (differs in {changed}): "
                "use a new output folder, or delete it to start over"
            )
        return
    if any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds .tar shards not made by data.prepare")
    write_atomic(path, json.dumps(job, indent=1).encode())


def cut_chunk(work: dict, cfg: PrepareConfig) -> dict:
    clips, dropped = [], []
    for source in work["files"]:
        kept, rejected = cut_file(source, cfg)
        clips += kept
        dropped += rejected
    return work | {"clips": clips, "dropped": dropped}


def run_inline(works: list[dict], out: str, cfg: PrepareConfig, address=None) -> Iterator[dict]:
    models = [stage(config) for stage, config in model_stages(cfg)]
    for work in works:
        work = cut_chunk(work, cfg)
        for model in models:
            work = model(work)
        yield pack_chunk(work, out, int(cfg.shard_size_mb * 2**20))


def model_stages(cfg: PrepareConfig) -> list[tuple[type, object]]:
    """(actor class, its config) of each stage that runs a model, in order."""
    # Imported here: torch loads only in the processes that run a model, not in every worker.
    from data.prepare.models import AestheticScorer, Recaptioner

    stages = []
    if cfg.filter.aesthetic_model:
        stages.append((AestheticScorer, cfg.filter))
    if cfg.recaption.model:
        stages.append((Recaptioner, cfg.recaption))
    return stages


def run_ray(works: list[dict], out: str, cfg: PrepareConfig, address: str | None) -> Iterator[dict]:
    import ray

    if not works:
        return
    started = not ray.is_initialized()
    if started:
        connect(ray, address, cfg.workers)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # this process draws one bar for the whole job
        dataset = ray.data.from_items(works, override_num_blocks=len(works))
        # A worker's own footprint and its chunk's media a few times over (bytes, decoded
        # frames, encoded clips): reserving it schedules no more chunks than a node holds, and
        # keeps Ray from fusing the cutting into a model actor, so cutting runs on every CPU.
        shard_bytes = int(cfg.shard_size_mb * 2**20)
        tasks = {"memory": WORKER_MEMORY + CHUNK_MEMORY_FACTOR * shard_bytes}
        dataset = dataset.map(cut_chunk, fn_kwargs={"cfg": cfg}, **tasks)
        gpus = ray.cluster_resources().get("GPU", 0)
        for stage, config in model_stages(cfg):
            actors = cfg.recaption.actors or max(1, int(gpus))
            dataset = dataset.map(
                stage,
                fn_constructor_kwargs={"cfg": config},
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_gpus=1 if gpus else 0,
            )
        dataset = dataset.map(
            pack_chunk, fn_kwargs={"out": out, "shard_bytes": shard_bytes}, **tasks
        )
        yield from dataset.iter_rows()
    finally:
        if started:
            ray.shutdown()


def connect(ray, address: str | None, workers: int | None) -> None:
    """An existing cluster at `address` (or $RAY_ADDRESS), else a local Ray on this machine."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # "local": a new Ray of this process's own, never a cluster `ray start` left behind.
        ray.init(
            address="local",
            num_cpus=workers,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )


class Progress:
    """Files done of all, with the clips, samples and drops so far, and an ETA."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = tqdm(total=total, initial=done, unit="file", disable=not enabled, smoothing=0.1)
        self.counts = {"clips": 0, "samples": 0, "dropped": 0}

    def update(self, record: dict) -> None:
        for key in self.counts:
            self.counts[key] += record[key]
        self.bar.set_postfix(self.counts, refresh=False)
        self.bar.update(record["files"])

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def summary(report: dict, out: Path) -> str:
    reasons: dict[str, int] = {}
    for row in report["dropped"]:
        kind = row["reason"].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    dropped = ", ".join(f"{count} {kind}" for kind, count in sorted(reasons.items())) or "none"
    return (
        f"{report['files']} files -> {report['clips']} clips -> {report['samples']} samples in "
        f"{report['shards']} shards ({report['bytes'] / 2**20:.1f} MiB) at {out}\n"
        f"dropped: {dropped} (each with its reason in {out / 'report.json'})"
    )

"""Packing: a chunk's clips into tar shards, committed with the chunk's manifest rows and its
report, and at the end every chunk's into `manifest.parquet` and `report.json`.

A chunk is committed by its record `.prepare/chunks/chunk-NNNNNN.json`, written last and
atomically: a rerun skips the committed chunks and redoes any other, whose shards it
rewrites with the same bytes (sorted clips, fixed tar metadata), so a resumed run and an
uninterrupted one end with identical files.
"""

from __future__ import annotations

import json
import tarfile
from contextlib import ExitStack
from pathlib import Path

from data.manifest import index_shards
from data.shard_writer import add_member, merge_manifests, write_rows
from data.storage import atomic_path, write_atomic

WORK_DIR = ".prepare"
REPORT_NAME = "report.json"


def chunk_record(out: Path, chunk: int) -> Path:
    return out / WORK_DIR / "chunks" / f"chunk-{chunk:06d}.json"


def pack_chunk(work: dict, out: str, shard_bytes: int) -> dict:
    """Write the chunk's shards, manifest rows and record; returns the record (counts only)."""
    out = Path(out)
    clips = sorted(work["clips"], key=lambda clip: clip["key"])
    captioned = [clip for clip in clips if has_caption(clip)]
    rejected = [
        {
            "file": clip["file"],
            "reason": "no caption",
            "clip_s": json.loads(clip["json"]).get("clip_s"),
        }
        for clip in clips
        if not has_caption(clip)
    ]
    shards = write_tars(captioned, out, work["chunk"], shard_bytes)
    table = index_shards([str(out / name) for name in shards], shards)
    manifest = chunk_record(out, work["chunk"]).with_suffix(".parquet")
    write_rows(table, manifest)
    record = {
        "chunk": work["chunk"],
        "files": len(work["files"]),
        "clips": len(clips) + sum(row["reason"].startswith("filtered") for row in work["dropped"]),
        "samples": len(captioned),
        "shards": shards,
        "bytes": sum((out / name).stat().st_size for name in shards),
        "dropped": sorted(
            work["dropped"] + rejected, key=lambda row: (row["file"], row["clip_s"] or [])
        ),
    }
    write_atomic(chunk_record(out, work["chunk"]), json.dumps(record).encode())
    return {key: value for key, value in record.items() if key != "dropped"} | {
        "dropped": len(record["dropped"])
    }


def has_caption(clip: dict) -> bool:
    meta = json.loads(clip["json"])
    return bool(meta["caption"] or meta["recaption"])


def write_tars(clips: list[dict], out: Path, chunk: int, shard_bytes: int) -> list[str]:
    """Shards of at most `shard_bytes` (or one sample), named by chunk and part; each appears
    under its name only once it is whole."""
    names: list[str] = []
    tar = None
    with ExitStack() as shard:
        for clip in clips:
            if tar is None or (tar.offset > 0 and tar.offset + len(clip["media"]) > shard_bytes):
                shard.close()  # the previous shard: its tar closed, then renamed into place
                names.append(f"shard-{chunk:06d}-{len(names):02d}.tar")
                tmp = shard.enter_context(atomic_path(out / names[-1]))
                tar = shard.enter_context(tarfile.open(tmp, mode="w"))
            for ext, data in sample_members(clip):
                add_member(tar, f"{clip['key']}.{ext}", data)
    return names


def sample_members(clip: dict) -> list[tuple[str, bytes]]:
    """(extension, bytes) of a sample: its media, then its `json` metadata."""
    meta = json.loads(clip["json"])
    if not meta["caption"]:  # the loader needs one; a recaption is the only text there is
        meta["caption"] = meta["recaption"]
    return [(clip["ext"], clip["media"]), ("json", json.dumps(meta).encode())]


def finalize(out: Path, chunks: int, source: str) -> dict:
    """`manifest.parquet` and `report.json` from every chunk, in chunk order."""
    records = [json.loads(chunk_record(out, chunk).read_text()) for chunk in range(chunks)]
    merge_manifests([chunk_record(out, c).with_suffix(".parquet") for c in range(chunks)], out)
    report = {
        "source": source,
        "files": sum(r["files"] for r in records),
        "clips": sum(r["clips"] for r in records),
        "samples": sum(r["samples"] for r in records),
        "shards": sum(len(r["shards"]) for r in records),
        "bytes": sum(r["bytes"] for r in records),
        "dropped": [
            {key: value for key, value in row.items() if value is not None}
            for r in records
            for row in r["dropped"]
        ],
    }
    write_atomic(out / REPORT_NAME, json.dumps(report, indent=1).encode())
    return report

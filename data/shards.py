"""Webdataset tar shards: the writer, and the index the loader reads them by.

Each sample holds the original file's bytes (`mp4`, `jpg`, ...) and a `json` member with
metadata probed at write time (width, height, fps, frames, duration, caption, recaption,
source). Beside the shards, `index.json` records where each sample's members sit in
its tar, so the loader can read any sample with one seek; shards from other webdataset
tools are indexed by scanning their tar headers.

    python -m data.shards VIDEOS --captions captions.csv --out SHARDS [--shard-size 256MB]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tarfile
from pathlib import Path

import webdataset as wds

from data.decode import IMAGE_EXTS, VIDEO_EXTS, DecodeError, probe

INDEX_NAME = "index.json"


def read_captions(path: Path) -> list[dict]:
    """Rows with `file`, `caption` and optionally `recaption`, from CSV or JSONL."""
    if not path.exists():
        raise FileNotFoundError(f"captions file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    for number, row in enumerate(rows, start=1):
        for column in ("file", "caption"):
            if not row.get(column):
                raise ValueError(f"{path}: row {number} has no '{column}' column value")
    return rows


def index_tar(path: Path) -> list[dict]:
    """Samples of one tar: key, media member (extension, offset, size) and metadata."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile() or "." not in Path(member.name).name:
                continue
            key, ext = member.name.split(".", 1)
            entry = samples.setdefault(key, {"key": key})
            if ext == "json":
                entry["meta"] = json.loads(tar.extractfile(member).read())
            elif ext.lower() in VIDEO_EXTS + IMAGE_EXTS:
                entry.update(media=ext, offset=member.offset_data, size=member.size)
    return [s for s in samples.values() if "media" in s and "meta" in s]


def write_index(out_dir: Path) -> dict:
    shards = sorted(out_dir.glob("*.tar"))
    index = {"version": 1, "shards": [{"file": s.name, "samples": index_tar(s)} for s in shards]}
    tmp = out_dir / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(out_dir / INDEX_NAME)
    return index


def write_shards(
    source_dir: str | Path,
    captions_file: str | Path,
    out_dir: str | Path,
    shard_size_bytes: int = 256 * 2**20,
    seed: int = 0,
) -> dict:
    """Pack the captioned files of `source_dir` into shards; returns a summary. Missing or
    unreadable files are skipped and listed, never written."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source folder {source_dir} does not exist")
    rows = read_captions(Path(captions_file))
    random.Random(seed).shuffle(rows)  # a shard holds a mix, so reading in order is a mix too
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    written = 0
    with wds.ShardWriter(
        str(out_dir / "shard-%06d.tar"), maxsize=shard_size_bytes, verbose=0
    ) as sink:
        for row in rows:
            path = source_dir / row["file"]
            ext = path.suffix.lstrip(".").lower()
            try:
                data = path.read_bytes()
                meta = probe(data, ext, str(path))
            except (OSError, DecodeError) as error:
                skipped.append(f"{row['file']}: {error}")
                continue
            meta.update(
                caption=row["caption"], recaption=row.get("recaption") or "", source=row["file"]
            )
            sink.write({"__key__": f"{written:08d}", ext: data, "json": json.dumps(meta).encode()})
            written += 1
    index = write_index(out_dir)
    size = sum((out_dir / s["file"]).stat().st_size for s in index["shards"])
    return {"samples": written, "skipped": skipped, "shards": len(index["shards"]), "bytes": size}


def _parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Pack captioned videos and images into shards.")
    parser.add_argument("source", help="folder of videos and images")
    parser.add_argument(
        "--captions", required=True, help="CSV or JSONL: file, caption[, recaption]"
    )
    parser.add_argument("--out", required=True, help="folder for the tar shards and index.json")
    parser.add_argument("--shard-size", default="256MB", type=_parse_size)
    parser.add_argument("--seed", default=0, type=int)
    args = parser.parse_args(argv)
    summary = write_shards(args.source, args.captions, args.out, args.shard_size, args.seed)
    print(
        f"{summary['samples']} samples in {summary['shards']} shards "
        f"({summary['bytes'] / 2**20:.1f} MiB) at {args.out}; skipped {len(summary['skipped'])}"
    )
    for reason in summary["skipped"]:
        print(f"  skipped {reason}")
    return summary


if __name__ == "__main__":
    main()

"""Webdataset tar shards: the writer.

Each sample holds the original file's bytes (`mp4`, `jpg`, ...) and a `json` member with
metadata probed at write time (width, height, fps, frames, duration, caption, recaption,
source). Beside the shards, `manifest.parquet` (`data/manifest.py`) records where each
sample's members sit in its tar and its sizes, so the loader can plan without opening a tar
and read any sample with one byte-range request.

    python -m data.shards VIDEOS --captions captions.csv --out SHARDS [--shard-size 256MB]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
from pathlib import Path

import webdataset as wds

from data.decode import IMAGE_EXTS, VIDEO_EXTS, DecodeError, probe
from data.manifest import MANIFEST_NAME, index_shards, write_manifest

log = logging.getLogger(__name__)


def read_captions(path: Path) -> list[dict]:
    """Rows with `file`, `caption` and optionally `recaption`, from CSV or JSONL."""
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = [
            _json_row(path, number, line)
            for number, line in enumerate(path.read_text().splitlines(), start=1)
            if line.strip()
        ]
    else:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"{path}: no column {sorted(missing)} (the header has {reader.fieldnames})"
                )
            rows = list(reader)
    for number, row in enumerate(rows, start=1):
        for column in ("file", "caption"):
            if not row.get(column):
                raise ValueError(f"{path}: row {number} has an empty or missing '{column}'")
    return rows


def _json_row(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {number} is not JSON: {error}") from error
    if not isinstance(row, dict):
        raise ValueError(f"{path}: line {number} is not a JSON object")
    return row


def write_shards(
    source_dir: str | Path,
    captions_file: str | Path,
    out_dir: str | Path,
    shard_size_bytes: int = 256 * 2**20,
    seed: int = 0,
) -> dict:
    """Pack the captioned files of `source_dir` into shards in the empty or new `out_dir`;
    returns a summary. Missing or unreadable files are skipped and listed, never written."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source folder {source_dir} does not exist")
    if any(out_dir.glob("*.tar")):
        # The loader reads every tar of a folder: stale shards would join the dataset.
        raise FileExistsError(f"{out_dir} already holds .tar shards: write into a new folder")
    rows = read_captions(Path(captions_file))
    random.Random(seed).shuffle(rows)  # a shard holds a mix, so reading in order is a mix too
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    shards: list[Path] = []
    written = 0
    with wds.ShardWriter(
        str(out_dir / "shard-%06d.tar"),
        maxsize=shard_size_bytes,
        verbose=0,
        post=lambda name: shards.append(Path(name)),
        mtime=0,  # the same inputs give byte-identical shards
    ) as sink:
        for row in rows:
            path = source_dir / row["file"]
            ext = path.suffix.lstrip(".").lower()
            try:
                if ext not in VIDEO_EXTS + IMAGE_EXTS:
                    raise DecodeError(f"unsupported extension {ext!r}")
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
    write_manifest(
        index_shards([str(s) for s in shards], [s.name for s in shards]),
        str(out_dir / MANIFEST_NAME),
    )
    size = sum(s.stat().st_size for s in shards)
    return {"samples": written, "skipped": skipped, "shards": len(shards), "bytes": size}


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
    parser.add_argument(
        "--out", required=True, help="folder for the tar shards and manifest.parquet"
    )
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

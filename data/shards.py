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
import logging
import random
import tarfile
from pathlib import Path

import webdataset as wds

from data.decode import IMAGE_EXTS, VIDEO_EXTS, DecodeError, probe

INDEX_NAME = "index.json"
PROBED_FIELDS = ("width", "height", "fps", "frames")
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


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) by the webdataset rule: the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, ext.lower()


def index_tar(path: Path) -> list[dict]:
    """Samples of one tar: key, media member (extension, offset, size) and metadata.

    Metadata comes from each sample's `json` member; shards from other tools may lack it, so
    a missing caption is read from a `txt` member and missing sizes are probed."""
    by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # offsets only mean something uncompressed
            for member in tar:
                if member.isfile():
                    key, ext = split_member_name(member.name)
                    by_key.setdefault(key, {})[ext] = member
            samples = [_index_sample(tar, path, key, members) for key, members in by_key.items()]
    except tarfile.ReadError as error:
        raise ValueError(f"shard {path} is not an uncompressed tar: {error}") from error
    return [sample for sample in samples if sample is not None]


def _index_sample(
    tar: tarfile.TarFile, path: Path, key: str, members: dict[str, tarfile.TarInfo]
) -> dict | None:
    media = next((ext for ext in members if ext in VIDEO_EXTS + IMAGE_EXTS), None)
    if media is None:
        return None
    try:
        meta = json.loads(tar.extractfile(members["json"]).read()) if "json" in members else {}
        if "caption" not in meta and "txt" in members:
            meta["caption"] = tar.extractfile(members["txt"]).read().decode().strip()
        if "caption" not in meta:
            raise ValueError("no caption (neither a json 'caption' nor a txt member)")
        if any(field not in meta for field in PROBED_FIELDS):
            meta.update(probe(tar.extractfile(members[media]).read(), media, key))
    except (ValueError, UnicodeDecodeError, DecodeError) as error:
        log.warning("leaving sample %s of %s out of the index: %s", key, path, error)
        return None
    member = members[media]
    return {
        "key": key,
        "media": media,
        "offset": member.offset_data,
        "size": member.size,
        "meta": meta,
    }


def write_index(out_dir: Path, shards: list[Path]) -> dict:
    """Index `shards` into `out_dir/index.json` (atomically: a reader never sees half)."""
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
    index = write_index(out_dir, shards)
    size = sum(s.stat().st_size for s in shards)
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

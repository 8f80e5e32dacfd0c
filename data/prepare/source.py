"""The source: which files, with which captions, in which chunks.

SOURCE is a local folder (captions from `<name>.txt` beside a file, if any), an object-store
prefix (`s3://`, `gs://`), or a list (CSV, JSON array, JSONL or Parquet) with a `file` column
(a path relative to the list's folder, an absolute path, or a URL) and optional `caption` and
`recaption` columns. The lists other trainers keep are read as they are, known by their
columns (`LIST_FORMATS`): Open-Sora's `path` and `text`, DiffSynth-Studio's `video` (or
`image`) and `prompt`, LTX-Video-Trainer's `media_path` and `caption`, musubi-tuner's
`video_path` (or `image_path`) and `caption`; their other columns are ignored.
Files are shuffled by the seed, so a shard holds a mix, and cut into chunks of about one
shard of source bytes: a chunk is the unit of work, of parallelism and of resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random

import fsspec
import pyarrow as pa
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq

from data.storage import is_remote

LIST_EXTS = (".csv", ".json", ".jsonl", ".parquet")
# (format, its file column, its caption column), in the order tried: Tessera's own `file`
# first (its caption optional, its `recaption` kept); another format needs both columns.
LIST_FORMATS = (
    ("Tessera", "file", "caption"),
    ("Open-Sora", "path", "text"),
    ("DiffSynth-Studio", "video", "prompt"),
    ("DiffSynth-Studio", "image", "prompt"),
    ("LTX-Video-Trainer", "media_path", "caption"),
    ("musubi-tuner", "video_path", "caption"),
    ("musubi-tuner", "image_path", "caption"),
)
SAMPLE_OVERHEAD = 2048  # a sample's tar headers, padding and json member, about


def list_source(source: str) -> list[dict]:
    """Rows of `file` (as the source names it), `url`, `size`, `caption`, `recaption`, sorted
    by file."""
    if source.endswith(LIST_EXTS):
        rows = list_rows(source)
    elif is_remote(source):
        rows = list_prefix(source)
    elif os.path.isdir(source):
        rows = list_folder(source)
    else:
        raise FileNotFoundError(
            f"source {source!r} is neither a folder, an s3:// or gs:// prefix, nor a "
            f"{'/'.join(LIST_EXTS)} list"
        )
    if not rows:
        raise FileNotFoundError(f"source {source!r} holds no files")
    return sorted(rows, key=lambda row: row["file"])


def list_folder(folder: str) -> list[dict]:
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = os.path.join(root, name)
                found[os.path.relpath(path, folder)] = (path, os.path.getsize(path))
    return with_sidecars(found)


def list_prefix(prefix: str) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(prefix)
    protocol = prefix.split("://", 1)[0]
    found = {}
    for path, info in fs.find(root, detail=True).items():
        file = posixpath.relpath(path, root)
        if not posixpath.basename(file).startswith("."):
            found[file] = (f"{protocol}://{path}", info["size"])
    return with_sidecars(found)


def with_sidecars(found: dict[str, tuple[str, int]]) -> list[dict]:
    """Rows of the listed files; `<name>.txt` beside a file is its caption, read by the worker
    that cuts the file (`caption_url`), not here: a listing of millions reads no captions."""
    stems = {os.path.splitext(file)[0] for file in found if not file.endswith(".txt")}
    rows = []
    for file, (url, size) in found.items():
        stem, ext = os.path.splitext(file)
        if ext == ".txt" and stem in stems:
            continue
        sidecar = found.get(f"{stem}.txt") if ext != ".txt" else None
        rows.append(entry(file, url, size, caption_url=sidecar[0] if sidecar else ""))
    return rows


def list_rows(path: str) -> list[dict]:
    """A caption list, in any of the `LIST_FORMATS`; errors name the list and the row."""
    table, file_column = tessera_columns(read_list(path), path)
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    rows = []
    for number, row in enumerate(table.to_pylist(), start=1):
        file = row.get("file")
        if not file or not isinstance(file, str):
            raise ValueError(f"{path}: row {number} has an empty or missing {file_column!r}")
        url = file if is_remote(file) or os.path.isabs(file) else f"{base}/{file}"
        rows.append(entry(file, url, 0, row.get("caption") or "", row.get("recaption") or ""))
    sizes = file_sizes([row["url"] for row in rows])
    return [row | {"size": sizes.get(row["url"], 0)} for row in rows]


def tessera_columns(table: pa.Table, path: str) -> tuple[pa.Table, str]:
    """The list's columns as Tessera's: the first of `LIST_FORMATS` whose columns it has,
    its file and caption columns renamed `file` and `caption` (with `recaption`, in Tessera's
    own form), the rest dropped; and the list's own name for its file column, for errors."""
    columns = table.column_names
    for name, file, caption in LIST_FORMATS:
        if file in columns and (name == "Tessera" or caption in columns):
            own = ("recaption",) if name == "Tessera" else ()
            kept = [c for c in (file, caption, *own) if c in columns]
            renamed = {file: "file", caption: "caption"}
            return table.select(kept).rename_columns([renamed.get(c, c) for c in kept]), file
    accepted = ", ".join(
        f"{file} [+ {caption}]" if name == "Tessera" else f"{file} + {caption} ({name})"
        for name, file, caption in LIST_FORMATS
    )
    raise ValueError(f"{path}: its columns {columns} are no known list's: a list has {accepted}")


def file_sizes(urls: list[str]) -> dict[str, int]:
    """Sizes for chunking (a missing file: none, and its worker reports it): local files by
    stat, remote ones by listing each folder once, not one request per file."""
    sizes = {
        url: os.path.getsize(url) for url in urls if not is_remote(url) and os.path.isfile(url)
    }
    folders = {url.rsplit("/", 1)[0] for url in urls if is_remote(url)}
    for folder in sorted(folders):
        fs, root = fsspec.core.url_to_fs(folder)
        protocol = folder.split("://", 1)[0]
        try:
            listed = fs.ls(root, detail=True)
        except FileNotFoundError:
            continue
        sizes.update({f"{protocol}://{info['name']}": info["size"] for info in listed})
    return sizes


def read_list(path: str) -> pa.Table:
    try:
        with fsspec.open(path, "rb") as f:
            if path.endswith(".csv"):
                # Paths and captions stay text, even where every one looks like a number.
                text = {c: pa.string() for _, *names in LIST_FORMATS for c in names}
                text["recaption"] = pa.string()
                options = pa.csv.ConvertOptions(strings_can_be_null=False, column_types=text)
                return pa.csv.read_csv(f, convert_options=options)
            if path.endswith(".jsonl"):
                return pa.json.read_json(f)
            if path.endswith(".json"):
                return json_array(json.load(f), path)
            return pq.read_table(f)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"source list {path} does not exist") from error
    except (pa.ArrowInvalid, pa.ArrowTypeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path}: not a readable {path.rsplit('.', 1)[1]} list: {error}"
        ) from error


def json_array(rows: object, path: str) -> pa.Table:
    """A `.json` list (LTX-Video-Trainer's form): an array of objects, each a row; a column
    for every key any object has."""
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: a .json list must be an array of objects")
    keys = dict.fromkeys(key for row in rows for key in row)
    return pa.table({key: [row.get(key) for row in rows] for key in keys})


def entry(
    file: str, url: str, size: int, caption: str = "", recaption: str = "", caption_url: str = ""
) -> dict:
    return {
        "file": file,
        "url": url,
        "size": int(size),
        "caption": caption,
        "recaption": recaption,
        "caption_url": caption_url,
    }


def chunk_files(rows: list[dict], seed: int, chunk_bytes: int) -> list[list[dict]]:
    """Shuffled by `seed`, numbered (`index`: the file's place in that order), and cut into
    chunks of at least one file and about `chunk_bytes` of source data."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    chunks: list[list[dict]] = [[]]
    filled = 0
    for index, row in enumerate(order):
        size = row["size"] + SAMPLE_OVERHEAD
        if chunks[-1] and filled + size > chunk_bytes:
            chunks.append([])
            filled = 0
        chunks[-1].append(row | {"index": index})
        filled += size
    return chunks


def listing_digest(rows: list[dict]) -> str:
    """Changes when a file is added, removed, resized, or captioned otherwise."""
    digest = hashlib.sha256()
    for row in rows:
        fields = ("file", "size", "caption", "recaption", "caption_url")
        digest.update(json.dumps([row[field] for field in fields]).encode())
    return digest.hexdigest()

"""The manifest: one Parquet row per sample of a folder of webdataset tar shards.

A row says where the sample's tar records sit (`shard`, and `offset` and `size` of the span from
its first member's header to the end of its last member's padded data, so one byte-range read
fetches the whole sample as a small tar of its own) and what it is (`media` extension, `width`, `height`, `frames`, `fps`, `duration`,
`has_recaption`). Captions stay in the sample's `json` (or `txt`) member and are read with the
sample. `shard` is a file name relative to the manifest's folder, or an absolute path or URL.

`python -m data.prepare` writes `manifest.parquet` beside the tars it packs. Shards made by other
tools, local or remote, are indexed into one in parallel:

    python -m data.manifest index s3://bucket/videos/ [--out s3://bucket/videos/manifest.parquet]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.decode import IMAGE_EXTS, VIDEO_EXTS, DecodeError, probe
from data.latents import LATENT_MEDIA
from data.storage import (
    atomic_path,
    checked_url,
    exists,
    is_remote,
    join,
    local_path,
    parent,
    redact,
)

MANIFEST_NAME = "manifest.parquet"
LEGACY_INDEX_NAME = "index.json"
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("media", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("frames", pa.int32()),
        ("fps", pa.float64()),
        ("duration", pa.float64()),
        ("has_recaption", pa.bool_()),
    ]
)
PROBED_FIELDS = ("width", "height", "fps", "frames")
log = logging.getLogger(__name__)


# --- indexing tars -------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) by the webdataset rule: the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, ext.lower()


def sample_members(tar: tarfile.TarFile) -> dict[str, dict[str, tarfile.TarInfo]]:
    """The file members of a tar by sample key, then extension, in tar order."""
    by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in tar:
        if member.isfile():
            key, ext = split_member_name(member.name)
            by_key.setdefault(key, {})[ext] = member
    return by_key


def media_extension(members: dict) -> str | None:
    return next((ext for ext in members if ext in (*VIDEO_EXTS, *IMAGE_EXTS, LATENT_MEDIA)), None)


def read_caption_fields(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> dict:
    """The sample's `json` metadata, with a `txt` member as its caption where json has none."""
    meta = json.loads(tar.extractfile(members["json"]).read()) if "json" in members else {}
    if "caption" not in meta and "txt" in members:
        meta["caption"] = tar.extractfile(members["txt"]).read().decode().strip()
    if not meta.get("caption"):
        raise ValueError("no caption (neither a json 'caption' nor a txt member)")
    return meta


def index_tar(url: str, shard: str | None = None) -> list[dict]:
    """Manifest rows of one tar, local or remote; `shard` is what the rows name it by (default
    its URL). Metadata comes from each sample's `json` member; shards from other tools may lack
    it, so a missing caption is read from a `txt` member and missing sizes are probed. Samples
    without media or caption are left out with a warning."""
    shard = shard or url
    try:
        with (
            fsspec.open(checked_url(url), "rb") as raw,
            tarfile.open(fileobj=raw, mode="r:") as tar,
        ):
            rows = [
                _row(tar, url, shard, key, members) for key, members in sample_members(tar).items()
            ]
    except tarfile.ReadError as error:  # offsets only mean something uncompressed
        raise ValueError(f"shard {redact(url)} is not an uncompressed tar: {error}") from error
    return [row for row in rows if row is not None]


def _row(tar: tarfile.TarFile, url: str, shard: str, key: str, members: dict) -> dict | None:
    media = media_extension(members)
    if media is None:
        return None
    try:
        meta = read_caption_fields(tar, members)
        if any(field not in meta for field in PROBED_FIELDS):
            meta.update(probe(tar.extractfile(members[media]).read(), media, key))
    except (ValueError, UnicodeDecodeError, DecodeError) as error:
        log.warning("leaving sample %s of %s out of the manifest: %s", key, redact(url), error)
        return None
    first = min(members.values(), key=lambda m: m.offset)
    last = max(members.values(), key=lambda m: m.offset_data)
    frames, fps = int(meta["frames"]), float(meta["fps"])
    return {
        "key": key,
        "shard": shard,
        "offset": first.offset,
        "size": last.offset_data
        + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        - first.offset,
        "media": media,
        "width": int(meta["width"]),
        "height": int(meta["height"]),
        "frames": frames,
        "fps": fps,
        "duration": float(meta.get("duration", frames / fps if fps > 0 else 0.0)),
        "has_recaption": bool(meta.get("recaption")),
    }


def index_shards(urls: list[str], names: list[str] | None = None, workers: int = 1) -> pa.Table:
    """The manifest table of `urls` (in order), indexed by `workers` processes."""
    names = names or urls
    if workers > 1 and len(urls) > 1:
        with ProcessPoolExecutor(min(workers, len(urls)), mp_context=get_context("fork")) as pool:
            per_shard = list(pool.map(index_tar, urls, names))
    else:
        per_shard = [index_tar(url, name) for url, name in zip(urls, names, strict=True)]
    return pa.Table.from_pylist([row for rows in per_shard for row in rows], schema=SCHEMA)


def write_manifest(table: pa.Table, url: str) -> None:
    """Write atomically: a reader sees the old manifest or the whole new one."""
    if is_remote(url):
        with fsspec.open(url, "wb") as f:  # one object PUT: atomic in object stores
            pq.write_table(table, f, row_group_size=1 << 20)
        return
    with atomic_path(local_path(url)) as tmp:
        pq.write_table(table, tmp, row_group_size=1 << 20)


# --- finding and reading manifests for `data.shards` ---------------------------------------


@dataclass(frozen=True)
class ManifestSource:
    url: str  # the manifest file
    shards: tuple[str, ...] | None = None  # only the rows of these shard URLs; None: all rows


def manifest_of(folder: str) -> str:
    """The manifest URL of a shard folder, or a clear error saying how to write one."""
    url = join(folder, MANIFEST_NAME)
    if exists(url):
        return url
    if exists(join(folder, LEGACY_INDEX_NAME)):
        raise FileNotFoundError(
            f"{redact(folder)} has the old index.json but no {MANIFEST_NAME}: convert it with "
            f"`python -m data.manifest index {redact(folder)}`"
        )
    raise FileNotFoundError(
        f"no manifest {redact(url)}: index the folder's shards with "
        f"`python -m data.manifest index {redact(folder)}`"
    )


def _tars(entry: str) -> list[str]:
    """The tar URLs an entry names: a tar, a glob of tars, or every tar of a folder."""
    is_glob = any(c in entry for c in "*?[")
    if entry.endswith(".tar") and not is_glob:
        if not exists(entry):
            raise FileNotFoundError(f"no such shard folder or file {redact(entry)}")
        return [entry if is_remote(entry) else os.path.normpath(local_path(entry))]
    if is_remote(entry):
        fs, path = fsspec.core.url_to_fs(entry)
        found = fs.glob(path) if is_glob else fs.ls(path, detail=False)
        scheme = entry.split("://")[0]
        return sorted(f"{scheme}://{p}" for p in found if p.endswith(".tar"))
    if is_glob:
        found = glob.glob(local_path(entry))
    else:
        found = [os.path.join(local_path(entry), n) for n in os.listdir(local_path(entry))]
    return sorted(os.path.normpath(p) for p in found if p.endswith(".tar"))


def resolve_sources(spec: str) -> list[ManifestSource]:
    """The manifests behind `data.shards`: comma-separated shard folders or URL prefixes (their
    `manifest.parquet`), manifest files (`*.parquet`), tars or globs of tars, and brace lists of
    tars in webdataset's notation, `shard-{000000..000999}.tar` (the rows of those shards in
    their folder's manifest). The tars of a brace list are not looked up one by one: the plan's
    shard check on rank 0 names any that are missing, before training."""
    entries = [
        checked_url(entry.strip()) for entry in re.split(BETWEEN_ENTRIES, spec) if entry.strip()
    ]
    if not entries:
        raise FileNotFoundError("data.shards is empty: give a shard folder, a manifest or tars")
    sources = []
    for entry in entries:
        if "{" in entry:
            # Imported here: webdataset is not on the GPU image, which only reads folders.
            from webdataset.shardlists import expand_urls

            tars = expand_urls(entry)
            if not all(tar.endswith(".tar") for tar in tars):
                raise FileNotFoundError(f"data.shards={spec!r}: {entry!r} names files not .tar")
            sources += _sources_of_tars(tars)
        elif entry.endswith(".parquet"):
            if not exists(entry):
                raise FileNotFoundError(f"data.shards={spec!r}: no manifest {redact(entry)}")
            sources.append(ManifestSource(entry))
        elif entry.endswith(".tar") or any(c in entry for c in "*?["):
            tars = _tars(entry)
            if not tars:
                raise FileNotFoundError(f"data.shards={spec!r}: {entry!r} matches no .tar file")
            sources += _sources_of_tars(tars)
        else:
            is_folder = exists(entry) and (is_remote(entry) or os.path.isdir(local_path(entry)))
            if not is_folder:
                raise FileNotFoundError(
                    f"data.shards={spec!r}: no such shard folder or file {redact(entry)}"
                )
            sources.append(ManifestSource(manifest_of(entry)))
    return sources


BETWEEN_ENTRIES = r",(?![^{]*\})"  # a comma that is not inside a brace list


def _sources_of_tars(tars: list[str]) -> list[ManifestSource]:
    """The tars' rows of their folders' manifests, a folder at a time."""
    local = [t if is_remote(t) else os.path.normpath(local_path(t)) for t in tars]
    return [
        ManifestSource(manifest_of(folder), tuple(t for t in local if parent(t) == folder))
        for folder in dict.fromkeys(parent(t) for t in local)
    ]


def manifest_batches(source: ManifestSource, rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """A manifest's rows, up to `rows` at a time, so that no more than a batch of them is ever in
    memory. `shard` comes dictionary-encoded with full paths or URLs (a batch names each of its
    shards once) and filtered to `source.shards` when given. Fails naming the file and the
    columns it lacks or leaves empty."""
    with fsspec.open(source.url, "rb") as f:
        parquet = pq.ParquetFile(f, read_dictionary=["shard", "media"])
        lacking = [name for name in SCHEMA.names if name not in parquet.schema_arrow.names]
        if lacking:
            raise ValueError(f"manifest {redact(source.url)} has no column {lacking}")
        folder = parent(source.url)
        wanted = None if source.shards is None else set(source.shards)
        for batch in parquet.iter_batches(batch_size=rows, columns=SCHEMA.names):
            with_nulls = [name for name in SCHEMA.names if batch.column(name).null_count]
            if with_nulls:
                raise ValueError(f"manifest {redact(source.url)} has empty values in {with_nulls}")
            shard = batch.column("shard")
            urls = [join(folder, name) for name in shard.dictionary.to_pylist()]
            shard = pa.DictionaryArray.from_arrays(shard.indices, pa.array(urls))
            batch = batch.set_column(SCHEMA.get_field_index("shard"), "shard", shard)
            if wanted is not None:
                keep = np.array([url in wanted for url in urls], dtype=bool)
                batch = batch.filter(pa.array(keep[shard.indices.to_numpy(zero_copy_only=False)]))
            yield batch


def read_manifest(source: ManifestSource) -> pa.Table:
    """A whole manifest as a table, `shard` as full paths or URLs: for inspecting small ones."""
    batches = list(manifest_batches(source))
    return pa.Table.from_batches(batches).cast(SCHEMA) if batches else SCHEMA.empty_table()


# --- the command ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> pa.Table:
    parser = argparse.ArgumentParser(description="Index webdataset tar shards into a manifest.")
    sub = parser.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="index tars (local or s3://, gs://, http(s)://)")
    index.add_argument("inputs", nargs="+", help="shard folders or prefixes, tars, or globs")
    index.add_argument("--out", help="manifest to write (default: the shards' folder's)")
    index.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    urls = [url for entry in args.inputs for url in _tars(checked_url(entry))]
    if not urls:
        parser.error(f"{args.inputs} hold no .tar file")
    folders = {parent(url) for url in urls}
    if args.out is None and len(folders) > 1:
        parser.error("the tars lie in several folders: name the manifest with --out")
    out = checked_url(args.out or join(folders.pop(), MANIFEST_NAME))
    # Shards beside the manifest are named relative to it, so the folder can move.
    names = [posixpath.basename(u) if parent(u) == parent(out) else u for u in urls]
    table = index_shards(urls, names, args.workers)
    write_manifest(table, out)
    print(f"{table.num_rows} samples of {len(urls)} shards in {redact(out)}")
    return table


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()

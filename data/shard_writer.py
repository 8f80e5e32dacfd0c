"""Writing shard folders so that a rerun writes the same bytes and a reader never sees half a
file: tar members with fixed metadata, files replaced atomically, and per-part manifests merged
into one. Shared by `data.prepare` and the latent-shard encoding job (`data/encode_job.py`)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data.manifest import MANIFEST_NAME, SCHEMA
from data.storage import atomic_path, write_atomic

ROW_GROUP = 1 << 20  # manifest rows per Parquet row group, as data.manifest writes them


def write_rows(table: pa.Table, path: Path) -> None:
    """A manifest part, atomically."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_atomic(path, buffer.getvalue().to_pybytes())


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A webdataset member with fixed metadata (time 0, read-only), so a rerun writes the
    same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def merge_manifests(parts: list[Path], out: Path) -> None:
    """Streams the manifest parts into `out/manifest.parquet`, in order, in row groups of
    `ROW_GROUP` rows."""
    pending: list[pa.Table] = []
    with atomic_path(out / MANIFEST_NAME) as tmp, pq.ParquetWriter(tmp, SCHEMA) as writer:
        for part in parts:
            pending.append(pq.read_table(part))
            if sum(t.num_rows for t in pending) >= ROW_GROUP:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)

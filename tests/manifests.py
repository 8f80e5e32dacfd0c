"""Reading what the loader plans with, from tests: manifest rows, their byte spans and planned
keys."""

from __future__ import annotations

import io
import tarfile

from data.manifest import read_manifest, resolve_sources, sample_members
from data.plan import DataPlan


def manifest_rows(spec: str) -> list[dict]:
    """Every manifest row of a `data.shards` spec, in plan order (sample id = position)."""
    return [row for source in resolve_sources(spec) for row in read_manifest(source).to_pylist()]


def span_members(row: dict) -> dict[str, dict[str, bytes]]:
    """The members in a (local) manifest row's byte span, read as the small tar it is."""
    with open(row["shard"], "rb") as f:
        f.seek(row["offset"])
        span = f.read(row["size"])
    assert len(span) == row["size"] and row["size"] % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(span)) as tar:
        return {
            key: {ext: tar.extractfile(member).read() for ext, member in members.items()}
            for key, members in sample_members(tar).items()
        }


def planned_keys(plan: DataPlan, epoch: int, seed: int = 0) -> list[list[str]]:
    """The sample keys of every batch of an epoch's plan."""
    return [
        [plan.key(i) for i in plan.batch(seed, epoch, index).sample_ids]
        for index in range(len(plan.epoch(seed, epoch)))
    ]

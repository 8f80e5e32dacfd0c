"""Reading what the loader plans with, from tests: manifest rows and planned keys."""

from __future__ import annotations

from data.manifest import read_manifest, resolve_sources
from data.plan import DataPlan


def manifest_rows(spec: str) -> list[dict]:
    """Every manifest row of a `data.shards` spec, in plan order (sample id = position)."""
    return [row for source in resolve_sources(spec) for row in read_manifest(source).to_pylist()]


def planned_keys(plan: DataPlan, epoch: int, seed: int = 0) -> list[list[str]]:
    """The sample keys of every batch of an epoch's plan."""
    return [
        [plan.key(i) for i in plan.batch(seed, epoch, index).sample_ids]
        for index in range(len(plan.epoch(seed, epoch)))
    ]

"""The sample reader: a planned sample's bytes, fetched as one byte range of its shard.

The manifest gives each sample's span in its tar (every member, from the first header on), so a
local read is one `pread` and a remote one a single ranged GET; the span is parsed as the small
tar it is. Captions come from the sample's own `json` (or `txt`) member.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

from data.manifest import read_caption_fields, sample_members
from data.plan import DataPlan
from data.storage import DiskCache, RangeReader, missing, redact


class SampleError(ValueError):
    """A sample whose bytes arrived but do not match the manifest."""


@dataclass
class RawSample:
    key: str
    media: bytes
    meta: dict  # the json member: caption, recaption, ...


class SampleReader:
    def __init__(
        self,
        plan: DataPlan,
        retries: int = 3,
        backoff_s: float = 0.5,
        cache_dir: str | Path = ".cache/data",
        cache_mb: int = 0,
        retry_seed: int = 0,
    ):
        self.plan = plan
        cache = DiskCache(Path(cache_dir) / "samples", cache_mb * 2**20) if cache_mb else None
        self.ranges = RangeReader(retries, backoff_s, cache, retry_seed)

    def check_shards(self) -> None:
        """Fail, naming them, when shards of the plan are missing (before any training)."""
        absent = missing(self.plan.shards)
        if absent:
            shown = ", ".join(redact(url) for url in absent[:5])
            more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
            raise FileNotFoundError(
                f"{len(absent)} shards of the manifest are missing: {shown}{more}"
            )

    def read(self, sample_id: int) -> RawSample:
        """Raises storage.ReadError when the bytes cannot be fetched, SampleError when they do
        not hold the sample the manifest names."""
        plan, columns = self.plan, self.plan.columns
        url, offset = plan.shard(sample_id), int(columns["offset"][sample_id])
        span = self.ranges.read(url, offset, int(columns["size"][sample_id]))
        key, media = plan.key(sample_id), plan.media(sample_id)
        try:
            with tarfile.open(fileobj=io.BytesIO(span), mode="r:") as tar:
                members = sample_members(tar)
                if list(members) != [key] or media not in members[key]:
                    raise SampleError(f"holds {sorted(members)}, not {key!r}.{media}")
                return RawSample(
                    key,
                    tar.extractfile(members[key][media]).read(),
                    read_caption_fields(tar, members[key]),
                )
        except (tarfile.TarError, ValueError, UnicodeDecodeError) as error:
            raise SampleError(
                f"{redact(url)} at byte {offset}: {error} (is the manifest older than the shard?)"
            ) from error

"""A least-recently-used map bounded by the bytes of its values."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class ByteLRU:
    """Keeps values up to `max_bytes` in all, dropping the least recently used beyond it; the
    caller says what a value weighs. Counts hits and misses."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        if key in self.entries:
            self.bytes -= self.entries.pop(key)[1]
        self.entries[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            self.bytes -= self.entries.popitem(last=False)[1][1]

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

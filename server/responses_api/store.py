"""Stored responses (`store: true`): what previous_response_id, GET, input_items and DELETE read.

Bounded three ways, so a busy server's memory stays flat: a count, a total size (the JSON bytes
of each entry), and a time to live; past a bound the least recently used entries go first.
Every entry belongs to the API key that made it, and any other key is told it does not exist
(the same 404 as an unknown id: ids are not a way to probe for other clients' data).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StoreLimits:
    max_items: int = 1024
    max_bytes: int = 256 * 1024 * 1024
    ttl_seconds: float = 3600.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"responses store {name} must be positive, got {value}")


@dataclass
class StoredResponse:
    owner: str  # the API key id ("" when the server runs without keys)
    response: dict[str, Any]
    input_items: list[dict[str, Any]]  # every item the response was generated from (previous turns included)
    size: int = 0
    stored_at: float = 0.0

    def history(self) -> list[dict[str, Any]]:
        """What a response continuing this one starts from: its input items, then its output."""
        output: list[dict[str, Any]] = self.response["output"]
        return self.input_items + output


@dataclass
class ResponseStore:
    limits: StoreLimits = field(default_factory=StoreLimits)
    clock: Callable[[], float] = time.monotonic
    _entries: OrderedDict[str, StoredResponse] = field(default_factory=OrderedDict)
    _bytes: int = 0

    def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        entry = StoredResponse(owner, response, input_items)
        entry.size = len(json.dumps([response, input_items], separators=(",", ":"), ensure_ascii=False).encode())
        if entry.size > self.limits.max_bytes:
            return  # bigger than the whole store: kept nowhere rather than emptying the store for it
        self._drop(response["id"])
        entry.stored_at = self.clock()
        self._entries[response["id"]] = entry
        self._bytes += entry.size
        self._evict()

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The entry if it exists, is still alive and belongs to `owner` (a use refreshes its LRU place)."""
        self._expire()
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            return None
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, owner: str, response_id: str) -> bool:
        if self.get(owner, response_id) is None:
            return False
        self._drop(response_id)
        return True

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self._bytes -= entry.size

    def _expire(self) -> None:
        deadline = self.clock() - self.limits.ttl_seconds
        expired = [key for key, entry in self._entries.items() if entry.stored_at <= deadline]
        for key in expired:
            self._drop(key)

    def _evict(self) -> None:
        self._expire()
        while len(self._entries) > self.limits.max_items or self._bytes > self.limits.max_bytes:
            self._drop(next(iter(self._entries)))

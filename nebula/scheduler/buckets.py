"""Members filed under integer keys, walked in ascending key order: how placement
finds the nodes with just enough free memory without sorting every node per request."""

from __future__ import annotations

import bisect
from collections.abc import Iterator


class Buckets:
    """Members filed under integer keys; walk them in ascending key order."""

    __slots__ = ("_keys", "_members")

    def __init__(self) -> None:
        self._members: dict[int, dict[int, None]] = {}  # dict as an ordered set
        self._keys: list[int] = []

    def add(self, key: int, member: int) -> None:
        bucket = self._members.get(key)
        if bucket is None:
            bucket = self._members[key] = {}
            bisect.insort(self._keys, key)
        bucket[member] = None

    def remove(self, key: int, member: int) -> None:
        bucket = self._members[key]
        del bucket[member]
        if not bucket:
            del self._members[key]
            del self._keys[bisect.bisect_left(self._keys, key)]

    def from_key(self, key: int) -> Iterator[int]:
        """Members with a key >= `key`, smallest key first."""
        start = bisect.bisect_left(self._keys, key)
        for k in self._keys[start:]:
            bucket = self._members.get(k)
            if bucket:
                yield from list(bucket)

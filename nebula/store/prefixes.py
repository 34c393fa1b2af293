"""Prefix routing's shared index: which replica each router process sent which
prompt prefixes to, so that every router and worker learns every other's choices.

Keys (spelled in `nebula.keys`):
- `nebula:prefix-feed` stream, capped at about `FEED_ENTRIES` entries: each entry
  is one router process (`i`), one replica (`p`) and the prefix keys newly sent
  to it (`k`: 16 hex digits each). Readers tail it; a new reader starts from its
  last entries, which hold the most recent prefixes. Nothing else reads it, and
  losing it (a Redis restart) costs cache hits until routers have routed again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nebula import keys
from nebula.store.core import Core

FEED_ENTRIES = 20_000
KEYS_PER_ENTRY = 2048
KEY_HEX = 16


@dataclass(frozen=True, slots=True)
class Learned:
    instance: str
    placement_id: str
    keys: list[int]


def _pack(values: Sequence[int]) -> str:
    return "".join(f"{v:016x}" for v in values)


def _unpack(text: str) -> list[int]:
    try:
        return [int(text[i : i + KEY_HEX], 16) for i in range(0, len(text), KEY_HEX)]
    except ValueError:
        return []  # not written by this version: skipped, as unknown fields are


class PrefixFeed:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def publish(self, instance: str, sent: Mapping[str, Sequence[int]]) -> None:
        """This process sent these new prefix keys to these replicas."""
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=False) as pipe:
            for pid, values in sent.items():
                for start in range(0, len(values), KEYS_PER_ENTRY):
                    chunk = values[start : start + KEYS_PER_ENTRY]
                    fields: dict[Any, Any] = {"i": instance, "p": pid, "k": _pack(chunk)}
                    pipe.xadd(keys.PREFIX_FEED, fields, maxlen=FEED_ENTRIES, approximate=True)
            await pipe.execute()

    async def recent(self, count: int) -> tuple[str, list[Learned]]:
        """The last `count` entries, oldest first, and the id to tail from."""
        async with self.core.reachable():
            entries: list[Any] = await self.core.redis.xrevrange(keys.PREFIX_FEED, count=count)
        entries.reverse()
        last = str(entries[-1][0]) if entries else "0-0"
        return last, [_learned(fields) for _, fields in entries]

    async def after(self, last: str, block_ms: int, count: int = 500) -> tuple[str, list[Learned]]:
        """Entries after id `last` (waiting up to `block_ms` for one), and the new last id."""
        async with self.core.reachable():
            answer: Any = await self.core.redis.xread({keys.PREFIX_FEED: last}, count, block_ms)
        if not answer:
            return last, []
        entries = answer[0][1]
        return str(entries[-1][0]), [_learned(fields) for _, fields in entries]


def _learned(fields: Mapping[str, str]) -> Learned:
    return Learned(fields.get("i", ""), fields.get("p", ""), _unpack(fields.get("k", "")))

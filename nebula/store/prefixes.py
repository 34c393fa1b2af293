"""Prefix routing's shared index: which replica each router process sent which
prompt prefixes to, so that every router and worker learns every other's choices.

Keys (spelled in `nebula.redis_keys`):
- `nebula:prefix-feed` stream, capped at about `FEED_ENTRIES` entries. Each entry
  is one of (`o`, the operation):
  - "" (keys): router process `i` newly sent prefix keys `k` (16 hex digits
    each) to replica `p`;
  - `drop`: router process `i` learned that replica `p` no longer holds keys `k`;
  - `evict`: replica `p`'s engine evicted blocks of the prompts it was sent under
    these sessions (`e`: JSON, session -> the fraction of its prompt still
    cached), from its node's agent (agent/kv_watch.py);
  - `clear`: replica `p`'s engine dropped its whole prefix cache.
  Readers tail it; a new reader starts from its last entries, which hold the
  most recent prefixes. Losing it (a Redis restart) costs cache hits until
  routers have routed again, never an answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nebula import redis_keys
from nebula.store.core import Core

FEED_ENTRIES = 20_000
KEYS_PER_ENTRY = 2048
KEY_HEX = 16


@dataclass(frozen=True, slots=True)
class Learned:
    op: str  # "" (keys sent), "drop", "evict" or "clear"
    instance: str
    placement_id: str
    keys: list[int]
    evicted: dict[str, float]  # evict: session -> the fraction of its prompt still cached


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

    async def publish(
        self,
        instance: str,
        sent: Mapping[str, Sequence[int]],
        dropped: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """This process sent these new prefix keys to these replicas (and learned
        that these replicas dropped those)."""
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=False) as pipe:
            for op, batch in (("", sent), ("drop", dropped or {})):
                for pid, values in batch.items():
                    for start in range(0, len(values), KEYS_PER_ENTRY):
                        chunk = values[start : start + KEYS_PER_ENTRY]
                        fields = {"o": op, "i": instance, "p": pid, "k": _pack(chunk)}
                        _add(pipe, fields)
            await pipe.execute()

    async def evicted(self, placement_id: str, lost: Mapping[str, float], cleared: bool) -> None:
        """Replica `placement_id`'s engine evicted these sessions' prompts past these
        fractions (or, `cleared`, everything)."""
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=False) as pipe:
            if cleared:
                _add(pipe, {"o": "clear", "p": placement_id})
            if lost:
                _add(pipe, {"o": "evict", "p": placement_id, "e": json.dumps(lost)})
            await pipe.execute()

    async def recent(self, count: int) -> tuple[str, list[Learned]]:
        """The last `count` entries, oldest first, and the id to tail from."""
        async with self.core.reachable():
            entries: Any = await self.core.redis.xrevrange(redis_keys.PREFIX_FEED, count=count)
        entries.reverse()
        last = str(entries[-1][0]) if entries else "0-0"
        return last, [_learned(fields) for _, fields in entries]

    async def after(self, last: str, block_ms: int, count: int = 500) -> tuple[str, list[Learned]]:
        """Entries after id `last` (waiting up to `block_ms` for one), and the new last id."""
        async with self.core.reachable():
            answer: Any = await self.core.redis.xread(
                {redis_keys.PREFIX_FEED: last}, count, block_ms
            )
        if not answer:
            return last, []
        entries = answer[0][1]
        return str(entries[-1][0]), [_learned(fields) for _, fields in entries]


def _add(pipe: Any, fields: dict[str, str]) -> None:
    pipe.xadd(redis_keys.PREFIX_FEED, fields, maxlen=FEED_ENTRIES, approximate=True)


def _learned(fields: Mapping[str, str]) -> Learned:
    evicted: dict[str, float] = {}
    if fields.get("o") == "evict":
        try:
            raw = json.loads(fields.get("e", "{}"))
            evicted = {str(s): float(f) for s, f in raw.items()} if isinstance(raw, dict) else {}
        except (ValueError, TypeError, AttributeError):
            evicted = {}  # not written by this version: skipped
    return Learned(
        fields.get("o", ""),
        fields.get("i", ""),
        fields.get("p", ""),
        _unpack(fields.get("k", "")),
        evicted,
    )

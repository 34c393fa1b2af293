"""Token usage per key, per model, per UTC day; and what each budgeted key spent.

Keys: `nebula:usage:{day}` (a hash per day: "{key}|{model}|p", "|c" and "|n":
prompt tokens, completion tokens, requests; it expires after the retention) and
`nebula:spend:{key}:{period}` (a counter per budgeted key and budget period; it
expires a day after the period ends). Routers write both: usage in batches,
spend as each answer ends, so that the next request through any router sees it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nebula import redis_keys
from nebula.store.core import Core

SEPARATOR = "|"
KINDS = {"p": "prompt_tokens", "c": "completion_tokens", "n": "requests"}
DAY_S = 86400


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: str
    key: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "day": self.day,
            "key": self.key,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "requests": self.requests,
        }


# (day, key name, model) -> [prompt tokens, completion tokens, requests]
Batch = dict[tuple[str, str, str], list[int]]


class Usage:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def record(self, batch: Batch, retention_days: int) -> None:
        """Add a batch of counts (one round trip)."""
        if not batch:
            return
        async with self.core.reachable(), self.core.redis.pipeline(transaction=False) as pipe:
            days = set()
            for (day, key, model), counts in batch.items():
                field = SEPARATOR.join((key, model, ""))
                for kind, n in zip("pcn", counts, strict=True):
                    if n:
                        pipe.hincrby(redis_keys.usage(day), field + kind, n)
                days.add(day)
            for day in days:
                pipe.expire(redis_keys.usage(day), retention_days * DAY_S)
            await pipe.execute()

    async def charge(self, key: str, period: str, tokens: int, ends_at: float) -> int:
        """Add `tokens` to what `key` spent in `period`; what it spent now."""
        async with self.core.reachable(), self.core.redis.pipeline(transaction=True) as pipe:
            pipe.incrby(redis_keys.spend(key, period), tokens)
            pipe.expireat(redis_keys.spend(key, period), int(ends_at) + DAY_S)
            total, _ = await pipe.execute()
        return int(total)

    async def spent(self, key: str, period: str) -> int:
        async with self.core.reachable():
            raw = await self.core.redis.get(redis_keys.spend(key, period))
        return int(raw or 0)

    async def report(
        self, days: Iterable[str], key: str | None = None, model: str | None = None
    ) -> list[UsageRow]:
        """Each (day, key, model) with usage, newest day first."""
        days = list(days)
        async with self.core.reachable(), self.core.redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(redis_keys.usage(day))
            hashes = await pipe.execute()
        rows = []
        for day, fields in zip(days, hashes, strict=True):
            counts: dict[tuple[str, str], dict[str, int]] = {}
            for field, value in fields.items():
                parts = field.split(SEPARATOR)
                if len(parts) != 3 or parts[2] not in KINDS:
                    continue  # a newer writer's field
                if (key and parts[0] != key) or (model and parts[1] != model):
                    continue
                counts.setdefault((parts[0], parts[1]), {})[KINDS[parts[2]]] = int(value)
            rows += [UsageRow(day, k, m, **c) for (k, m), c in sorted(counts.items())]
        return rows

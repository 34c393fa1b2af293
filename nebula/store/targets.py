"""Where Prometheus finds every Nebula process's /metrics.

Key: `nebula:metrics-targets` (hash "kind:id" -> JSON {kind, id, address,
expires_at}); an entry past `expires_at` belongs to a dead process.
"""

from __future__ import annotations

import json
import time
from typing import Any

from nebula import redis_keys
from nebula.store import wire
from nebula.store.core import Core


class MetricsTargets:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def register(self, kind: str, ident: str, address: str, ttl_s: float) -> None:
        """Advertise a process's /metrics (HOST:PORT) for `ttl_s`; refresh before it lapses."""
        entry = {"kind": kind, "id": ident, "address": address, "expires_at": time.time() + ttl_s}
        async with self.core.reachable():
            await self.core.redis.hset(
                redis_keys.METRICS_TARGETS, f"{kind}:{ident}", wire.dumps(entry)
            )

    async def live(self) -> list[dict[str, Any]]:
        """Live processes' /metrics addresses; lapsed entries are removed."""
        now = time.time()
        async with self.core.reachable():
            raw = await self.core.redis.hgetall(redis_keys.METRICS_TARGETS)
            entries = {field: json.loads(value) for field, value in raw.items()}
            dead = [f for f, e in entries.items() if float(e.get("expires_at", 0)) < now]
            if dead:
                await self.core.redis.hdel(redis_keys.METRICS_TARGETS, *dead)
        return sorted(
            (
                {k: e[k] for k in ("kind", "id", "address", "expires_at")}
                for f, e in entries.items()
                if f not in dead
            ),
            key=lambda e: (e["kind"], e["id"]),
        )

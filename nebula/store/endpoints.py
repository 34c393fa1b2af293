"""Endpoints: the healthy engines routers send requests to (node agents write).

Keys: `nebula:endpoint:{placement}` (JSON with a TTL: an engine whose agent
stops refreshing it lapses) and `nebula:endpoints` (sorted set, score = expiry
in ms, so readers never SCAN the keyspace).
"""

from __future__ import annotations

import json
import time

from redis.asyncio.client import Pipeline

from nebula import keys
from nebula.models import Endpoint
from nebula.store import wire
from nebula.store.core import Core


def encode(endpoint: Endpoint) -> str:
    return wire.dumps(
        {
            "placement_id": endpoint.placement_id,
            "request_id": endpoint.request_id,
            "model": endpoint.model,
            "node": endpoint.node,
            "url": endpoint.url,
            "task": endpoint.task,
        }
    )


def decode(raw: str | bytes) -> Endpoint:
    return Endpoint(**wire.known(Endpoint, json.loads(raw)))


class Endpoints:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def publish(self, endpoint: Endpoint, ttl_s: float, *, announce: bool) -> None:
        """Publish (or refresh) a healthy engine; it lapses with its TTL unless refreshed.

        `announce` wakes the routers at once (a new endpoint); plain refreshes don't.
        """
        ttl_ms = int(ttl_s * 1000)
        now_ms = int(time.time() * 1000)
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.endpoint(endpoint.placement_id), encode(endpoint), px=ttl_ms)
            pipe.zadd(keys.ENDPOINTS, {endpoint.placement_id: now_ms + ttl_ms})
            pipe.zremrangebyscore(keys.ENDPOINTS, "-inf", now_ms)
            if announce:
                pipe.publish(keys.EVENTS_CHANNEL, "endpoints")
            await pipe.execute()

    async def withdraw(self, placement_id: str) -> None:
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.endpoint(placement_id))
            pipe.zrem(keys.ENDPOINTS, placement_id)
            pipe.publish(keys.EVENTS_CHANNEL, "endpoints")
            await pipe.execute()

    @staticmethod
    def stage_read_live_ids(pipe: Pipeline) -> None:
        pipe.zrangebyscore(keys.ENDPOINTS, int(time.time() * 1000), "+inf")

    async def live(self) -> list[Endpoint]:
        """Every endpoint whose TTL has not lapsed."""
        async with self.core.reachable(), self.core.redis.pipeline(transaction=False) as pipe:
            self.stage_read_live_ids(pipe)
            [ids] = await pipe.execute()
        return await self.read(ids)

    async def read(self, placement_ids: list[str]) -> list[Endpoint]:
        """The endpoints of `placement_ids` still present."""
        if not placement_ids:
            return []
        async with self.core.reachable():
            raw = await self.core.redis.mget([keys.endpoint(i) for i in placement_ids])
        return [decode(r) for r in raw if r]

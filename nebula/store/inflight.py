"""What each router process has in flight to each engine: the drain's second witness.

An engine's own metrics say what it works on; they do not see a request still
on its way (sent by a router, not yet queued by the engine), and a busy engine
may not answer its metrics at all. The routers know what they sent, so each
router process reports its non-zero per-placement counts once a second, and a
draining agent waits until both witnesses say zero.

Keys (spelled in `nebula.redis_keys`):
- `nebula:router-in-flight:{instance}` hash with a TTL of a few reports:
  placement id -> requests in flight. A router that dies takes its report with it
  when the TTL lapses (its requests died with it).
- `nebula:router-in-flight` sorted set: instance -> unix time of its last report,
  so that a reader finds the hashes without SCAN. Members an hour old are trimmed
  by readers; a clean stop removes its own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from nebula import redis_keys
from nebula.store import wire
from nebula.store.core import Core

STALE_MEMBER_S = 3600.0


class RouterInFlight:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def report(self, instance: str, counts: Mapping[str, int], ttl_s: float) -> None:
        """Replace this router process's report (an empty one removes it)."""
        key = redis_keys.router_in_flight(instance)
        busy = {pid: n for pid, n in counts.items() if n > 0}
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if busy:
                pipe.hset(key, mapping=wire.for_hset(busy))
                pipe.pexpire(key, int(ttl_s * 1000))
                pipe.zadd(redis_keys.ROUTER_IN_FLIGHT, {instance: time.time()})
            else:
                pipe.zrem(redis_keys.ROUTER_IN_FLIGHT, instance)
            await pipe.execute()

    async def to(self, placement_id: str) -> int:
        """Requests every live router has in flight to `placement_id`."""
        redis = self.core.redis
        async with self.core.reachable():
            await redis.zremrangebyscore(
                redis_keys.ROUTER_IN_FLIGHT, "-inf", time.time() - STALE_MEMBER_S
            )
            instances = wire.texts(await redis.zrange(redis_keys.ROUTER_IN_FLIGHT, 0, -1))
            if not instances:
                return 0
            async with redis.pipeline(transaction=False) as pipe:
                for instance in instances:
                    pipe.hget(redis_keys.router_in_flight(instance), placement_id)
                counts = await pipe.execute()
        return sum(_count(n) for n in counts if n)


def _count(raw: str | bytes) -> int:
    try:
        return max(0, int(raw))
    except ValueError:
        return 1  # unreadable: unknown is not zero

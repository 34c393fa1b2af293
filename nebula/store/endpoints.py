"""Endpoints: the healthy engines routers send requests to, and the feed of their changes.

Keys:
- `nebula:endpoint-index`: hash placement id -> endpoint JSON, every endpoint now;
- `nebula:node-endpoints:{node}`: set of a node's placement ids (for the agent's
  resync and the scheduler's withdrawal of a dead node's endpoints);
- `nebula:endpoint-seq`: counter, bumped by every change;
- `nebula:endpoint-feed`: stream of the changes, entry id `{seq}-0`, fields
  `op` (`up`/`down`), `id`, `endpoint`; capped at about `FEED_LENGTH` entries.

Every change is one script: the index, the node's set, the counter and the
feed move together, and the routers are woken on pub/sub. An endpoint is
written when its engine becomes healthy and removed when it fails, stops, or
its node dies (the scheduler, when it declares the node dead): nothing is
rewritten while nothing changes, so the cost follows the rate of change, not
the cluster's size. A router reads the whole index once, then only the feed
from its last sequence number (`nebula.router.table`); a gap (the feed was
trimmed past it, Redis restarted from an older state) sends it back to a full
read.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import cast

from redis.asyncio.client import Pipeline

from nebula import redis_keys
from nebula.models import Endpoint
from nebula.store import wire
from nebula.store.core import Core

FEED_LENGTH = 10_000

# KEYS: index, seq, feed, node set, legacy key, legacy index.
# ARGV: op, id, endpoint JSON, feed length, channel.
_CHANGE = """
local id, seq = ARGV[2], nil
if ARGV[1] == 'down' then
  redis.call('DEL', KEYS[5])
  redis.call('ZREM', KEYS[6], id)
end
if ARGV[1] == 'up' then
  if redis.call('HGET', KEYS[1], id) == ARGV[3] then return 0 end
  redis.call('HSET', KEYS[1], id, ARGV[3])
  redis.call('SADD', KEYS[4], id)
else
  if redis.call('HDEL', KEYS[1], id) == 0 then return 0 end
  redis.call('SREM', KEYS[4], id)
end
seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], seq .. '-0',
           'op', ARGV[1], 'id', id, 'endpoint', ARGV[3])
redis.call('PUBLISH', ARGV[5], 'endpoints')
return seq
"""
# A node's endpoints, all but `ARGV[3..]`, withdrawn. KEYS: index, seq, feed, node set.
# ARGV: feed length, channel, ids to keep...
_RETAIN = """
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local gone = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if not keep[id] then
    redis.call('SREM', KEYS[4], id)
    if redis.call('HDEL', KEYS[1], id) == 1 then
      local seq = redis.call('INCR', KEYS[2])
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], seq .. '-0',
                 'op', 'down', 'id', id, 'endpoint', '')
      gone = gone + 1
    end
  end
end
if gone > 0 then redis.call('PUBLISH', ARGV[2], 'endpoints') end
return gone
"""


def encode(endpoint: Endpoint) -> str:
    return wire.dumps(asdict(endpoint))


def decode(raw: str | bytes) -> Endpoint:
    return Endpoint(**wire.known(Endpoint, json.loads(raw)))


def _keys(node: str) -> list[str]:
    return [
        redis_keys.ENDPOINT_INDEX,
        redis_keys.ENDPOINT_SEQ,
        redis_keys.ENDPOINT_FEED,
        redis_keys.node_endpoints(node),
    ]


def _change_keys(node: str, placement_id: str) -> list[str]:
    return [*_keys(node), redis_keys.legacy_endpoint(placement_id), redis_keys.LEGACY_ENDPOINTS]


class Endpoints:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._change = core.redis.register_script(_CHANGE)

    async def publish(self, endpoint: Endpoint) -> None:
        """A healthy engine: routers may send it requests until it is withdrawn."""
        args: list[str | int] = [
            "up",
            endpoint.placement_id,
            encode(endpoint),
            FEED_LENGTH,
            redis_keys.EVENTS_CHANNEL,
        ]
        async with self.core.reachable():
            await self._change(keys=_change_keys(endpoint.node, endpoint.placement_id), args=args)

    async def withdraw(self, placement_id: str, node: str) -> None:
        """Gone from routers (and from those not yet upgraded, see `publish_legacy`)."""
        args: list[str | int] = ["down", placement_id, "", FEED_LENGTH, redis_keys.EVENTS_CHANNEL]
        async with self.core.reachable():
            await self._change(keys=_change_keys(node, placement_id), args=args)

    async def publish_legacy(self, endpoint: Endpoint, ttl_s: float) -> None:
        """Also as Nebula before the change feed wrote it (a key with a TTL, refreshed by
        every probe), so routers not yet upgraded keep routing during a rolling
        upgrade (setting `legacy_endpoints`)."""
        ttl_ms = int(ttl_s * 1000)
        now_ms = int(time.time() * 1000)
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            pipe.set(redis_keys.legacy_endpoint(endpoint.placement_id), encode(endpoint), px=ttl_ms)
            pipe.zadd(redis_keys.LEGACY_ENDPOINTS, {endpoint.placement_id: now_ms + ttl_ms})
            pipe.zremrangebyscore(redis_keys.LEGACY_ENDPOINTS, "-inf", now_ms)
            await pipe.execute()

    async def retain(self, node: str, placement_ids: set[str]) -> int:
        """Withdraw every endpoint of `node` but these (an agent's resync after a
        restart or an outage: a withdrawal it could not write is written now)."""
        args: list[str | int] = [FEED_LENGTH, redis_keys.EVENTS_CHANNEL, *sorted(placement_ids)]
        async with self.core.reachable():
            return int(await self.core.redis.eval(_RETAIN, 4, *_keys(node), *args))

    async def all(self) -> list[Endpoint]:
        """Every published endpoint now (published while its engine answered its last
        probe; a liveness check of its own is not made here)."""
        async with self.core.reachable():
            raw = await self.core.redis.hvals(redis_keys.ENDPOINT_INDEX)
        return sorted(wire.readable(decode, raw, "endpoint"), key=lambda e: e.placement_id)

    # For the routers (router/table.py) and the scheduler, staged on their pipelines.

    @staticmethod
    def stage_withdraw_node(pipe: Pipeline, node: str) -> None:
        """A dead node's endpoints, all withdrawn (inside the scheduler's MULTI)."""
        pipe.eval(_RETAIN, 4, *_keys(node), FEED_LENGTH, redis_keys.EVENTS_CHANNEL)

    @staticmethod
    def stage_read_seq(pipe: Pipeline) -> None:
        pipe.get(redis_keys.ENDPOINT_SEQ)

    @staticmethod
    def stage_read_all(pipe: Pipeline) -> None:
        pipe.hvals(redis_keys.ENDPOINT_INDEX)

    async def changes_after(self, seq: int, count: int) -> list[tuple[int, str, str, str]]:
        """Feed entries after `seq` (at most `count`): (seq, op, id, endpoint JSON)."""
        async with self.core.reachable():
            entries = await self.core.redis.xrange(
                redis_keys.ENDPOINT_FEED, min=f"{seq + 1}-0", count=count
            )
        # Read with decode_responses: ids and fields are str (redis-py types them wider).
        read = cast(list[tuple[str, dict[str, str]]], entries)
        return [_entry(entry_id, fields) for entry_id, fields in read]


def _entry(entry_id: str, fields: dict[str, str]) -> tuple[int, str, str, str]:
    return (int(str(entry_id).split("-", 1)[0]), fields["op"], fields["id"], fields["endpoint"])

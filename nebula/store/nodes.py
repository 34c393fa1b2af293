"""Nodes: heartbeats (hashes with a TTL: expiry is death) and the operator's marks.

Keys: `nebula:nodes` (ids ever seen and not yet reaped), `nebula:node:{id}`
(heartbeat hash, TTL), `nebula:cordoned` and `nebula:draining` (sets).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from redis.asyncio.client import Pipeline

from nebula import redis_keys
from nebula.errors import NotFound
from nebula.models import Device, Node
from nebula.store import wire
from nebula.store.core import Core

# Which registered nodes still have a heartbeat, in one call for a thousand:
# a pipeline costs the client tens of microseconds per command.
_ALIVE = """
local alive = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 1 then alive[#alive + 1] = id end
end
return alive
"""
_HGETALL_EACH = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""


def encode(node: Node) -> dict[str, str]:
    return {
        wire.VERSION_FIELD: str(wire.VERSION),
        "id": node.id,
        "address": node.address,
        "devices": json.dumps([d.to_dict() for d in node.devices]),
        "cpu_count": str(node.cpu_count),
        "ram_total_mib": str(node.ram_total_mib),
        "ram_available_mib": str(node.ram_available_mib),
        "port_min": str(node.port_min),
        "port_max": str(node.port_max),
        "version": node.version,
        "heartbeat_at": repr(node.heartbeat_at),
    }


def decode_devices(raw: str) -> tuple[Device, ...]:
    return tuple(Device(**wire.known(Device, d)) for d in json.loads(raw or "[]"))


def decode(
    data: dict[str, str],
    *,
    cordoned: bool = False,
    draining: bool = False,
    devices: tuple[Device, ...] | None = None,  # already decoded from data["devices"]
) -> Node:
    return Node(
        id=data["id"],
        address=data["address"],
        devices=decode_devices(data.get("devices", "")) if devices is None else devices,
        cpu_count=int(data.get("cpu_count", 0)),
        ram_total_mib=int(data.get("ram_total_mib", 0)),
        ram_available_mib=int(data.get("ram_available_mib", 0)),
        port_min=int(data.get("port_min", 8100)),
        port_max=int(data.get("port_max", 8199)),
        version=data.get("version", ""),
        heartbeat_at=float(data.get("heartbeat_at", 0.0)),
        cordoned=cordoned or draining,
        draining=draining,
    )


class Nodes:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._heartbeats = core.redis.register_script(_HGETALL_EACH)

    async def addresses(self, node_ids: Iterable[str]) -> dict[str, str]:
        """The address each node registered with its heartbeat (absent: none now)."""
        ids = sorted(set(node_ids))
        async with self.core.reachable(), self.core.redis.pipeline(transaction=False) as pipe:
            for node_id in ids:
                pipe.hget(redis_keys.node(node_id), "address")
            found = await pipe.execute()
        return {node_id: a for node_id, a in zip(ids, found, strict=True) if a}

    async def heartbeat(self, node: Node, ttl_s: float) -> None:
        """Publish the node's heartbeat; it dies with its TTL unless renewed."""
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            pipe.sadd(redis_keys.NODES, node.id)
            pipe.delete(redis_keys.node(node.id))
            pipe.hset(redis_keys.node(node.id), mapping=wire.for_hset(encode(node)))
            pipe.pexpire(redis_keys.node(node.id), int(ttl_s * 1000))
            await pipe.execute()

    async def live(self) -> list[Node]:
        """Live nodes, with the operator's cordon and drain marks."""
        redis = self.core.redis
        async with self.core.reachable():
            async with redis.pipeline(transaction=False) as pipe:
                pipe.smembers(redis_keys.NODES)
                self.stage_read_marks(pipe)
                node_ids, cordoned, draining = await pipe.execute()
            async with redis.pipeline(transaction=False) as pipe:
                for node_id in sorted(node_ids):
                    pipe.hgetall(redis_keys.node(node_id))
                rows = await pipe.execute()
        return [
            decode(row, cordoned=row["id"] in cordoned, draining=row["id"] in draining)
            for row in rows
            if row
        ]

    async def ids(self) -> list[str]:
        """Every registered node, alive or not yet reaped."""
        async with self.core.reachable():
            return sorted(wire.texts(await self.core.redis.smembers(redis_keys.NODES)))

    async def set_cordon(self, node_id: str, *, cordoned: bool, drain: bool = False) -> None:
        """Cordon (no new placements), drain (also move placements off), or undo both."""
        redis = self.core.redis
        async with self.core.reachable():
            if not await redis.sismember(redis_keys.NODES, node_id):
                nodes = (
                    ", ".join(sorted(wire.texts(await redis.smembers(redis_keys.NODES)))) or "none"
                )
                raise NotFound(f"no node {node_id!r}; known nodes: {nodes}")
            async with redis.pipeline(transaction=True) as pipe:
                if cordoned:
                    pipe.sadd(redis_keys.CORDONED, node_id)
                    if drain:
                        pipe.sadd(redis_keys.DRAINING, node_id)
                else:
                    pipe.srem(redis_keys.CORDONED, node_id)
                    pipe.srem(redis_keys.DRAINING, node_id)
                pipe.publish(redis_keys.EVENTS_CHANNEL, "node")
                await pipe.execute()

    async def heartbeats(self, node_ids: list[str]) -> list[dict[str, str]]:
        """The raw heartbeat hashes of `node_ids` ({} for a lapsed one), in one call."""
        async with self.core.reachable():
            rows = await self._heartbeats(keys=[redis_keys.node(n) for n in node_ids])
        return [dict(zip(flat[::2], flat[1::2], strict=True)) for flat in rows]

    # Staged onto a caller's pipeline (see Requests).

    @staticmethod
    def stage_read_ids(pipe: Pipeline) -> None:
        pipe.smembers(redis_keys.NODES)

    @staticmethod
    def stage_read_marks(pipe: Pipeline) -> None:
        """Two replies: the cordoned nodes, the draining nodes."""
        pipe.smembers(redis_keys.CORDONED)
        pipe.smembers(redis_keys.DRAINING)

    @staticmethod
    def stage_read_alive(pipe: Pipeline) -> None:
        """The registered nodes whose heartbeat is present."""
        pipe.eval(_ALIVE, 1, redis_keys.NODES, redis_keys.node(""))

    @staticmethod
    def stage_forget(pipe: Pipeline, node_id: str) -> None:
        """Reap a dead node: it is registered and marked no more."""
        pipe.srem(redis_keys.NODES, node_id)
        pipe.srem(redis_keys.CORDONED, node_id)
        pipe.srem(redis_keys.DRAINING, node_id)

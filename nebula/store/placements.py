"""Placements: each node's desired engines (the scheduler writes) and what its
agent observed of them (the agent writes).

Keys: `nebula:placements:{node}` (hash id -> placement JSON),
`nebula:placement-state:{node}` (hash id -> observed state JSON) and
`nebula:placement-state:dirty` (nodes whose agents reported since the
scheduler's last pass). A node's agent wakes on `nebula:events:node:{node}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import NamedTuple

from redis.asyncio.client import Pipeline

from nebula import redis_keys
from nebula.models import Desired, Phase, Placement, PlacementState
from nebula.store import wire
from nebula.store.core import Core


def encode(p: Placement) -> str:
    return wire.dumps(
        {
            "id": p.id,
            "request_id": p.request_id,
            "node": p.node,
            "port": p.port,
            "spec": p.spec.to_dict(),
            "devices": list(p.devices),
            "desired": p.desired.value,
            "created_at": p.created_at,
            "drain_timeout_s": p.drain_timeout_s,
        }
    )


def decode(raw: str | bytes) -> Placement:
    data = json.loads(raw)
    return Placement(
        id=data["id"],
        request_id=data["request_id"],
        node=data["node"],
        port=int(data["port"]),
        spec=wire.spec_from_dict(data["spec"]),
        devices=tuple(data.get("devices", ())),
        desired=Desired(data.get("desired", Desired.RUN)),
        created_at=float(data.get("created_at", 0.0)),
        drain_timeout_s=data.get("drain_timeout_s"),
    )


def encode_state(s: PlacementState) -> str:
    return wire.dumps(
        {
            "phase": s.phase.value,
            "pid": s.pid,
            "restarts": s.restarts,
            "message": s.message,
            "updated_at": s.updated_at,
        }
    )


def decode_state(raw: str | bytes) -> PlacementState:
    data = json.loads(raw)
    return PlacementState(
        phase=Phase(data["phase"]),
        pid=data.get("pid"),
        restarts=int(data.get("restarts", 0)),
        message=data.get("message", ""),
        updated_at=float(data.get("updated_at", 0.0)),
    )


def decode_states(raw: dict[str, str]) -> dict[str, PlacementState]:
    """The states that can be read (the others are skipped and logged)."""
    return wire.readable_items(decode_state, raw, "placement state")[0]


class NodePlacements(NamedTuple):
    placements: list[Placement]
    unreadable: set[str]  # placement ids whose value could not be read


class Placements:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def of_node(self, node_id: str) -> list[Placement]:
        return (await self.read_node(node_id)).placements

    async def read_node(self, node_id: str) -> NodePlacements:
        """The node's placements, and the ids of those that cannot be read (an agent
        leaves their engines as they are rather than take them for unwanted)."""
        async with self.core.reachable():
            raw = wire.text_hash(await self.core.redis.hgetall(redis_keys.placements(node_id)))
        readable, bad = wire.readable_items(decode, raw, "placement")
        return NodePlacements(list(readable.values()), bad)

    async def states(self, node_id: str) -> dict[str, PlacementState]:
        async with self.core.reachable():
            raw = wire.text_hash(await self.core.redis.hgetall(redis_keys.placement_state(node_id)))
        return decode_states(raw)

    async def report(
        self, node_id: str, states: dict[str, PlacementState], *, drop: Iterable[str] = ()
    ) -> None:
        """The node agent's report of its engines."""
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            if states:
                pipe.hset(
                    redis_keys.placement_state(node_id),
                    mapping={pid: encode_state(s) for pid, s in states.items()},
                )
            dropped = list(drop)
            if dropped:
                pipe.hdel(redis_keys.placement_state(node_id), *dropped)
            pipe.sadd(redis_keys.PLACEMENT_STATE_DIRTY, node_id)
            pipe.publish(redis_keys.EVENTS_CHANNEL, "placement-state")
            await pipe.execute()

    async def all(self, node_ids: Iterable[str]) -> list[tuple[Placement, PlacementState | None]]:
        """Every placement of `node_ids` with its observed state (admin views)."""
        ids = sorted(node_ids)
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=False) as pipe:
            for node_id in ids:
                pipe.hgetall(redis_keys.placements(node_id))
                pipe.hgetall(redis_keys.placement_state(node_id))
            rows = await pipe.execute()
        out: list[tuple[Placement, PlacementState | None]] = []
        for placements, states in zip(rows[::2], rows[1::2], strict=True):
            readable, _ = wire.readable_items(decode, placements, "placement")
            known = decode_states(states)
            for pid, placement in sorted(readable.items()):
                out.append((placement, known.get(pid)))
        return out

    # Staged onto a caller's pipeline (see Requests).

    @staticmethod
    def stage_read_dirty_nodes(pipe: Pipeline) -> None:
        pipe.smembers(redis_keys.PLACEMENT_STATE_DIRTY)

    @staticmethod
    def stage_clear_dirty(pipe: Pipeline) -> None:
        pipe.delete(redis_keys.PLACEMENT_STATE_DIRTY)

    @staticmethod
    def stage_read_states(pipe: Pipeline, node_id: str) -> None:
        pipe.hgetall(redis_keys.placement_state(node_id))

    @staticmethod
    def stage_read(pipe: Pipeline, node_id: str) -> None:
        pipe.hgetall(redis_keys.placements(node_id))

    @staticmethod
    def stage_put(pipe: Pipeline, p: Placement) -> None:
        pipe.hset(redis_keys.placements(p.node), p.id, encode(p))

    @staticmethod
    def stage_drop(pipe: Pipeline, p: Placement) -> None:
        pipe.hdel(redis_keys.placements(p.node), p.id)
        pipe.hdel(redis_keys.placement_state(p.node), p.id)

    @staticmethod
    def stage_drop_node(pipe: Pipeline, node_id: str) -> None:
        pipe.delete(redis_keys.placements(node_id), redis_keys.placement_state(node_id))

    @staticmethod
    def stage_wake(pipe: Pipeline, node_ids: Iterable[str]) -> None:
        """Tell these nodes' agents their placements changed."""
        for node_id in sorted(set(node_ids)):
            pipe.publish(redis_keys.node_channel(node_id), "placements")

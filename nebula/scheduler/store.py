"""The scheduler's reads and writes, staged through the stores onto shared pipelines.

A pass reads in a fixed number of round trips whatever the cluster's size, and
writes all its changes in one MULTI/EXEC fenced by the leader lease, so a
leader that lost its lease (paused, partitioned) never writes after its
successor started.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from redis.exceptions import WatchError

from nebula import redis_keys
from nebula.scheduler.snapshot import Changes, Snapshot
from nebula.store import State, nodes, placements, request_format, wire

log = logging.getLogger(__name__)


class ClusterStore:
    def __init__(self, state: State) -> None:
        self.state = state

    async def read(
        self, snapshot: Snapshot, *, full: bool, last_used: bool | None = None
    ) -> Snapshot:
        """Refresh `snapshot`.

        Every pass reads node liveness and marks. A full pass reads every request,
        placement and placement state. Otherwise only what others changed since
        the last pass is read: requests marked dirty by load and unload, and the
        placement states of nodes whose agents marked them dirty. Placements are
        the leader's own writes, so its copy stays current between full passes.
        Node telemetry is read separately, by `read_telemetry`, only when needed.
        Models' last use is read with `last_used` (default: on full passes).
        """
        last_used = full if last_used is None else last_used
        st = self.state
        async with st.reachable():
            heads = await self._read_heads(full=full, last_used=last_used)
            async with st.redis.pipeline(transaction=False) as pipe:
                for node_id in heads.state_nodes:
                    st.placements.stage_read_states(pipe, node_id)
                if full:
                    for node_id in heads.node_ids:
                        st.placements.stage_read(pipe, node_id)
                st.requests.stage_read(pipe, heads.request_ids)
                rows = iter(await pipe.execute() if len(pipe) else [])
        _take_nodes(snapshot, heads)
        _take_states(snapshot, heads, rows, full=full)
        if full:
            snapshot.placements = {}
            for _ in heads.node_ids:
                for p in wire.readable(placements.decode, next(rows).values(), "placement"):
                    snapshot.placements[p.id] = p
            snapshot.requests = {}
        _take_requests(snapshot, heads.request_ids, rows)
        return snapshot

    async def _read_heads(self, *, full: bool, last_used: bool) -> Heads:
        """Liveness, marks, what changed (and clear the dirty marks), in one MULTI."""
        st = self.state
        async with st.redis.pipeline(transaction=True) as pipe:
            st.nodes.stage_read_ids(pipe)
            st.nodes.stage_read_marks(pipe)
            st.requests.stage_read_ids(pipe, dirty_only=not full)
            if full:
                st.nodes.stage_read_ids(pipe)
            else:
                st.placements.stage_read_dirty_nodes(pipe)
            st.requests.stage_clear_dirty(pipe)
            st.placements.stage_clear_dirty(pipe)
            st.nodes.stage_read_alive(pipe)
            if last_used:
                st.requests.stage_read_last_used(pipe)
            answers = await pipe.execute()
        node_ids, cordoned, draining, request_ids, state_nodes, _, _, alive, *used = answers
        return Heads(
            node_ids=sorted(node_ids),
            cordoned=frozenset(cordoned),
            draining=frozenset(draining),
            request_ids=sorted(request_ids),
            state_nodes=sorted(state_nodes),
            alive=set(alive),
            last_used=dict(used[0]) if used else None,
        )

    async def snapshot(self) -> Snapshot:
        """Everything, read afresh: a full pass's input."""
        snap = await self.read(Snapshot(), full=True)
        await self.read_telemetry(snap, snap.alive)
        return snap

    async def read_telemetry(self, snapshot: Snapshot, node_ids: Iterable[str]) -> None:
        """Read the heartbeats (telemetry) of `node_ids` into `snapshot.nodes`, in one call."""
        ids = sorted(node_ids)
        if not ids:
            return
        cordoned, draining = snapshot.marks
        for node_id, row in zip(ids, await self.state.nodes.heartbeats(ids), strict=True):
            if not row:
                snapshot.nodes.pop(node_id, None)
                continue
            raw_devices = row.get("devices", "")
            node = nodes.decode(
                row,
                cordoned=node_id in cordoned,
                draining=node_id in draining,
                devices=snapshot.devices_cache.get(raw_devices),
            )
            snapshot.devices_cache[raw_devices] = node.devices
            snapshot.nodes[node_id] = node
        if len(snapshot.devices_cache) > 4 * len(snapshot.alive) + 64:
            snapshot.devices_cache.clear()  # bounded: telemetry strings mostly change

    async def apply(self, changes: Changes, *, leader: str) -> bool:
        """Write one pass's changes atomically, only while `leader` holds the lease.

        Returns False, writing nothing, when the lease is someone else's.
        """
        st = self.state
        async with st.reachable(), st.redis.pipeline(transaction=True) as pipe:
            try:
                if not await st.lease.fenced(pipe, leader):
                    return False
                pipe.multi()
                for p in changes.put_placements:
                    st.placements.stage_put(pipe, p)
                for p in changes.drop_placements:
                    st.placements.stage_drop(pipe, p)
                for node_id in changes.dead_nodes:
                    st.placements.stage_drop_node(pipe, node_id)
                    st.endpoints.stage_withdraw_node(pipe, node_id)
                    st.nodes.stage_forget(pipe, node_id)
                for request in changes.scaled:
                    st.requests.stage_replicas(pipe, request)
                for request in changes.put_requests:
                    st.requests.stage_status(pipe, request)
                for request_id, text, status in changes.events:
                    st.requests.stage_event(pipe, request_id, text, status)
                for request in changes.gone_requests:
                    st.requests.stage_gone(pipe, request)
                pipe.publish(redis_keys.EVENTS_CHANNEL, "placements")
                touched = [p.node for p in changes.put_placements + changes.drop_placements]
                st.placements.stage_wake(pipe, touched)
                await pipe.execute()
            except WatchError:
                return False
        # What happened to each model, in the log too (`nebula-cli model show` has it
        # until the request is gone; the log keeps it after).
        for request_id, text, status in changes.events:
            log.info("%s (%s): %s", request_id, status.value, text)
        return True


@dataclass(frozen=True, slots=True)
class Heads:
    """The first read of a pass, by name."""

    node_ids: list[str]
    cordoned: frozenset[str]
    draining: frozenset[str]
    request_ids: list[str]
    state_nodes: list[str]  # nodes whose placement states are read
    alive: set[str]
    last_used: dict[str, float] | None  # None: not read this pass


def _take_nodes(snapshot: Snapshot, heads: Heads) -> None:
    snapshot.last_used_fresh = heads.last_used is not None
    if heads.last_used is not None:
        snapshot.last_used = heads.last_used
    snapshot.node_ids = set(heads.node_ids)
    snapshot.alive = heads.alive
    cordoned, draining = heads.cordoned, heads.draining
    marks = (cordoned, draining)
    snapshot.nodes = {
        n: node
        if marks == snapshot.marks
        else replace(node, cordoned=n in cordoned or n in draining, draining=n in draining)
        for n, node in snapshot.nodes.items()
        if n in snapshot.alive
    }
    snapshot.marks = marks
    snapshot.dirty_nodes = set(heads.state_nodes)


def _take_states(snapshot: Snapshot, heads: Heads, rows: Iterator[Any], *, full: bool) -> None:
    if full:
        snapshot.states = {}
        snapshot.state_ids = {}
        snapshot.unreadable_requests = set()
    for node_id in heads.state_nodes:
        fresh = placements.decode_states(next(rows))
        for pid in snapshot.state_ids.get(node_id, set()) - fresh.keys():
            snapshot.states.pop(pid, None)
        snapshot.state_ids[node_id] = set(fresh)
        snapshot.states.update(fresh)


def _take_requests(snapshot: Snapshot, request_ids: list[str], rows: Iterator[Any]) -> None:
    snapshot.dirty_requests = set(request_ids)
    for request_id in request_ids:
        row = next(rows)
        snapshot.unreadable_requests.discard(request_id)
        try:
            if row:
                snapshot.requests[request_id] = request_format.decode(row)
            else:
                snapshot.requests.pop(request_id, None)
        except wire.UNREADABLE as exc:
            # Left alone (its replicas too) until it can be read: never taken for gone.
            wire.skipped("model request", request_id, exc)
            snapshot.requests.pop(request_id, None)
            snapshot.unreadable_requests.add(request_id)

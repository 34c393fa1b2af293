"""The routing protocol: a router reads everything once, then only the changes; a gap
in the change feed (trimmed past it, Redis back with an older state) sends it back
to a full read, and every router converges on the same table."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from harness.cluster import Cluster, wait_for
from harness.endpoints import announce
from nebula import redis_keys
from nebula.models import Endpoint
from nebula.router.table import RoutingTable
from nebula.scheduler.service import Scheduler
from nebula.settings import Settings
from nebula.store import State
from tests.builders import cpu_node
from tests.nodesim import NodeSim


def endpoint(i: int, node: str = "node-x", model: str = "m") -> Endpoint:
    return Endpoint(f"p{i}", "r", model, node, f"http://10.0.0.{i % 250}:8100", "chat")


async def index(state: State) -> dict[str, Endpoint]:
    return {e.placement_id: e for e in await state.endpoints.all()}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield c
    await c.aclose()


async def test_after_one_full_read_a_router_reads_only_changes(state: State) -> None:
    for i in range(3):
        await announce(state, endpoint(i))
    table = RoutingTable()
    await table.refresh(state)
    assert set(table.by_id) == {"p0", "p1", "p2"} and table.full_reads == 1

    await announce(state, endpoint(3))
    await state.endpoints.withdraw("p0", "node-x")
    await announce(state, endpoint(1, model="other"))  # replaced
    await table.refresh(state)
    assert set(table.by_id) == {"p1", "p2", "p3"}
    assert [e.placement_id for e in table.endpoints("other")] == ["p1"]
    for _ in range(5):  # nothing changed: a poll, no read
        await table.refresh(state)
    assert table.full_reads == 1 and table.by_id == await index(state)

    # Publishing what is already there, or withdrawing what is not, is no change.
    seq = table.seq
    await announce(state, endpoint(3))
    await state.endpoints.withdraw("p0", "node-x")
    await table.refresh(state)
    assert table.seq == seq


async def test_a_gap_in_the_feed_means_a_full_read_and_the_table_converges(
    state: State, client: redis.asyncio.Redis
) -> None:
    await announce(state, endpoint(0))
    table = RoutingTable()
    await table.refresh(state)
    for i in range(1, 30):
        await announce(state, endpoint(i))
    await state.endpoints.withdraw("p0", "node-x")
    await client.xtrim(redis_keys.ENDPOINT_FEED, maxlen=5, approximate=False)  # trimmed past us
    await table.refresh(state)
    assert table.full_reads == 2
    assert table.by_id == await index(state) and "p0" not in table.by_id


async def test_redis_back_with_an_older_state_means_a_full_read(
    state: State, client: redis.asyncio.Redis
) -> None:
    for i in range(10):
        await announce(state, endpoint(i))
    table = RoutingTable()
    await table.refresh(state)
    await client.flushall()  # a Redis that lost its data: the sequence starts again
    await announce(state, endpoint(42))
    await table.refresh(state)
    assert table.full_reads == 2 and set(table.by_id) == {"p42"}


async def test_many_routers_stay_consistent_under_a_storm_of_changes(
    state: State, redis_url: str
) -> None:
    states = [State(redis_url) for _ in range(8)]
    tables = [RoutingTable() for _ in states]
    loops = [asyncio.create_task(t.keep_fresh(s, 0.5)) for t, s in zip(tables, states, strict=True)]
    rng = random.Random(7)
    try:
        for _ in range(300):
            i = rng.randrange(40)
            if rng.random() < 0.6:
                await announce(state, endpoint(i, model=f"m{rng.randrange(3)}"))
            else:
                await state.endpoints.withdraw(f"p{i}", "node-x")
            if rng.random() < 0.1:
                await asyncio.sleep(0.01)
        want = await index(state)

        async def converged() -> bool:
            return all(t.by_id == want for t in tables)

        await wait_for(converged, 10, "every table to match the index")
        assert all(t.full_reads == 1 for t in tables)  # the feed carried every change
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for s in states:
            await s.close()


async def test_a_dead_nodes_endpoints_are_withdrawn_when_it_is_declared_dead(
    state: State, settings: Settings
) -> None:
    node = NodeSim(state, cpu_node("cpu-a"), ttl_s=0.5)
    await node.beat()
    await announce(state, endpoint(1, node="cpu-a"))
    await announce(state, endpoint(2, node="cpu-b"))  # a node that is not ours
    scheduler = Scheduler(state, settings)

    async def withdrawn() -> bool:
        await scheduler.step()
        return "p1" not in await index(state)

    await wait_for(withdrawn, 15, "cpu-a's endpoint withdrawn")
    assert set(await index(state)) == {"p2"}


async def test_an_agent_withdraws_its_nodes_stale_endpoints_when_it_starts(
    state: State, redis_url: str, tmp_path: Path
) -> None:
    # Left by an agent that died before it could write the withdrawal.
    await announce(state, endpoint(9, node="node-a"))
    cluster = Cluster(redis_url, tmp_path)
    try:

        async def gone() -> bool:
            return "p9" not in await index(state)

        await wait_for(gone, 30, "the stale endpoint withdrawn by node-a's agent")
    finally:
        cluster.close()


async def test_legacy_mode_writes_what_routers_before_the_feed_read(
    state: State, client: redis.asyncio.Redis
) -> None:
    """During a rolling upgrade, agents also write the old form; a withdrawal removes
    both. (What a router before the change feed did: ZRANGEBYSCORE + MGET.)"""
    e = endpoint(5)
    await announce(state, e)
    await state.endpoints.publish_legacy(e, ttl_s=30)
    now_ms = int(time.time() * 1000)
    ids = await client.zrangebyscore(redis_keys.LEGACY_ENDPOINTS, now_ms, "+inf")
    assert ids == ["p5"]
    [raw] = await client.mget([redis_keys.legacy_endpoint(i) for i in ids])
    old = json.loads(raw)
    assert {k: old[k] for k in ("placement_id", "model", "url")} == {
        "placement_id": "p5", "model": "m", "url": e.url
    }  # fmt: skip
    await state.endpoints.withdraw("p5", "node-x")
    assert await client.zrangebyscore(redis_keys.LEGACY_ENDPOINTS, now_ms, "+inf") == []
    assert await client.get(redis_keys.legacy_endpoint("p5")) is None
    assert await index(state) == {}

"""Redis away, then back: under steady load, no request fails and no engine restarts.

Each outage lasts three node TTLs (the cluster's TTL is 4 s): long enough that
every heartbeat, endpoint and the leader lease lapse while Redis is away (or
are lost with it), which is what used to get every engine replaced.
"""

from __future__ import annotations

import asyncio

import pytest

from nebula.models import Status
from tests.faults.conftest import Node, steady_load

OUTAGE_S = 3 * 4.0


async def served_through(node: Node, fault: str) -> None:
    request_id = await node.ready(replicas=2)
    pids = await node.engine_pids()
    assert len(pids) == 2
    async with steady_load(node.router.url) as load:
        await asyncio.sleep(1.0)
        before = load.total
        if fault == "pause":
            node.redis.pause()
            await asyncio.sleep(OUTAGE_S)
            node.redis.resume()
        else:
            await asyncio.sleep(1.1)  # let AOF everysec write what there is
            node.redis.kill()
            await asyncio.sleep(OUTAGE_S)
            node.redis.start()
        # Through the return: stale keys found lapsed, the scheduler's grace over and
        # its passes after it (two node TTLs), under load all along.
        await asyncio.sleep(2 * 4.0)
    print(
        f"\nRedis {fault} for {OUTAGE_S:g}s: {load.total} requests, {load.results}, "
        f"{len(load.failures)} failed"
    )
    assert load.total - before > 50, load.results
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:5]}"
    assert await node.engine_pids() == pids, "an engine was restarted"
    request = await node.state.requests.get(request_id)
    assert request.status is Status.READY, request.message
    events = [e["message"] for e in await node.state.requests.events(request_id)]
    assert not any("lost" in e for e in events), events
    # Still a node with both replicas published once the grace is over: a scheduler
    # that took the silent node for dead would have withdrawn them.
    assert len(await node.state.endpoints.all()) == 2


@pytest.mark.timeout(180)
async def test_redis_paused_for_three_node_ttls(node: Node) -> None:
    await served_through(node, "pause")


@pytest.mark.timeout(180)
async def test_redis_killed_and_restarted_from_its_aof(node: Node) -> None:
    await served_through(node, "kill")

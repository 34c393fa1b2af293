"""Replicas that follow the load, through the real stack (scheduler, node, agent,
router; test engines that take 2 requests at once at 50 ms a word): a sustained
overload scales a model out to its maximum and, once the load stops, back to its
minimum through the drain, with no request lost; a steady load at the target
changes nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from harness.cluster import TEST_CATALOG, Cluster, wait_for
from harness.processes import RouterProcess
from nebula.models import ModelRequest, Status
from nebula.store import State

CATALOG = (
    TEST_CATALOG
    + """
[models.busy_chat]
model = "test/busy"
engine = "test"
cpu_memory_gib = 1
max_concurrency = 2
replicas = "1..3"
engine_args = ["--token-ms", "50", "--max-num-seqs", "32"]
"""
)
UP_WINDOW_S, DOWN_WINDOW_S = 2.0, 4.0
ENV = {
    "NEBULA_SCALE_UP_WINDOW_S": str(UP_WINDOW_S),
    "NEBULA_SCALE_DOWN_WINDOW_S": str(DOWN_WINDOW_S),
}


@pytest.fixture
async def cluster(redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(redis_url, tmp_path, CATALOG, extra_env=ENV)
    yield c
    c.close()


async def load_busy(state: State, cluster: Cluster, replicas: int, top: int) -> ModelRequest:
    spec = cluster.catalog.get_spec("busy_chat")
    request = await state.requests.create(spec, replicas, max_replicas=top)
    await cluster.status(state, request.id, Status.READY, 30)
    return request


async def send_until(
    stop: asyncio.Event, router: RouterProcess, statuses: list[int], deadline: float
) -> None:
    """One request after another (8 words: 0.4 s) until told to stop (bounded)."""
    body = {"model": "busy_chat", "messages": [{"role": "user", "content": "a b c d e f g h"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        while not stop.is_set() and time.monotonic() < deadline:
            async with session.post(router.url + "/v1/chat/completions", json=body) as r:
                await r.read()
                statuses.append(r.status)


async def served(router: RouterProcess) -> None:
    async def check() -> bool:
        async with aiohttp.ClientSession() as s, s.get(router.url + "/v1/models") as r:
            return "busy_chat" in await r.text()

    await wait_for(check, 20, "busy_chat served")


async def replicas(state: State, ref: str, n: int, timeout: float) -> None:
    async def check() -> bool:
        request = await state.requests.get(ref)
        placed = await state.placements.of_node("node-a")
        return request.replicas == n and len([p for p in placed if p.request_id == ref]) == n

    await wait_for(check, timeout, f"{ref} at {n} replicas")


async def test_a_sustained_overload_scales_out_then_back_to_the_minimum(
    state: State, cluster: Cluster
) -> None:
    request = await load_busy(state, cluster, 1, 3)
    router = cluster.start_router()
    await served(router)
    stop, statuses = asyncio.Event(), []
    senders = asyncio.gather(
        *(send_until(stop, router, statuses, time.monotonic() + 90) for _ in range(12))
    )
    try:
        await replicas(state, request.id, 3, 60)
        await cluster.status(state, request.id, Status.READY, 30)
    finally:
        stop.set()
        await senders
    # Every request answered, through the scale-out and the drains.
    assert statuses and set(statuses) == {200}, statuses
    await replicas(state, request.id, 1, 60)
    texts = [e["message"] for e in await state.requests.events(request.id)]
    assert any("scaling out 1 -> 3" in t for t in texts), texts
    assert any("scaling in 3 -> 1" in t for t in texts), texts
    assert sum("stopping replica" in t and "scaled in" in t for t in texts) == 2, texts


async def test_a_steady_load_at_the_target_changes_nothing_for_three_windows(
    state: State, cluster: Cluster
) -> None:
    # Two replicas of 2 slots each, and 4 clients: the demand is the target.
    request = await load_busy(state, cluster, 2, 3)
    router = cluster.start_router()
    await served(router)
    stop, statuses = asyncio.Event(), []
    deadline = time.monotonic() + 3 * DOWN_WINDOW_S + 1
    await asyncio.gather(*(send_until(stop, router, statuses, deadline) for _ in range(4)))
    assert statuses and set(statuses) == {200}
    request = await state.requests.get(request.id)
    texts = [e["message"] for e in await state.requests.events(request.id)]
    assert request.replicas == 2 and not [t for t in texts if "scaling" in t], texts

"""Drains that fail closed, through the real stack (scheduler, supervisord, agent,
router; the test engine): an unload waits for every answer in flight, even when
the engine is too busy to answer its metrics in time, and even when the engine
does not yet count a request that a router has sent it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from harness.cluster import TEST_CATALOG, Cluster, wait_for
from harness.processes import RouterProcess, http_bytes
from nebula.models import Status
from nebula.store import State

CATALOG = (
    TEST_CATALOG
    + """
[models.busy_chat]
model = "test/busy"
engine = "test"
cpu_memory_gib = 1
# Answers of 40 tokens take 4 s; /metrics answers 2 s late, past the agent's probe
# timeout (a busy vLLM's metrics page does that).
engine_args = ["--token-ms", "100", "--tokens", "40", "--metrics-delay-ms", "2000"]
"""
)
MODEL = "busy_chat"
PROMPT = " ".join(f"w{i}" for i in range(60))


@pytest.fixture
async def cluster(redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(redis_url, tmp_path, CATALOG)
    yield c
    c.close()


async def stream(url: str, first: asyncio.Event) -> tuple[int, bool, bytes]:
    """A streamed answer through the router: (chunks, ended with [DONE], last line)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
    }
    chunks, done, last = 0, False, b""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.post(url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.strip():
                continue
            last = line
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: "):
                chunks += 1
                first.set()
    return chunks, done, last


async def unload_under_streams(
    state: State, cluster: Cluster, router: RouterProcess, **behaviour: object
) -> None:
    """Three answers in flight (the engine told `behaviour` first), then the unload:
    each must end with [DONE]."""
    request = await cluster.load(state, MODEL)
    await cluster.status(state, request.id, Status.READY)
    if behaviour:
        [endpoint] = await state.endpoints.all()
        url = endpoint.url + "/test/behaviour"
        status, _, body = await asyncio.to_thread(http_bytes, "POST", url, behaviour)
        assert status == 200, body
    await wait_for(lambda: served(router), what="the endpoint in the router's table")
    firsts = [asyncio.Event() for _ in range(3)]
    streams = [asyncio.create_task(stream(router.url, first)) for first in firsts]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 30)
    await state.requests.unload(request.id)
    for chunks, done, last in await asyncio.gather(*streams):
        assert done, f"a stream was cut after {chunks} chunks: {last!r}"
        assert chunks >= 40
    await cluster.gone(state, request.id)
    assert "drain timeout" not in cluster.agent_log()


async def served(router: RouterProcess) -> bool:
    status, _, body = await asyncio.to_thread(http_bytes, "GET", router.url + "/health")
    return status == 200 and b'"endpoints": 1' in body


async def test_a_busy_engine_whose_metrics_are_slow_is_not_cut(
    state: State, cluster: Cluster
) -> None:
    """The engine's /metrics takes 2 s (the agent's probe timeout is 0.5 s here): silence
    is not "idle", so the drain asks again with a longer wait, and waits for the answers."""
    router = cluster.start_router()
    await unload_under_streams(state, cluster, router)


async def test_the_routers_in_flight_count_is_a_second_witness(
    state: State, cluster: Cluster
) -> None:
    """The engine says 0 (as for a request not yet queued in it); the router knows it
    sent 3: the drain waits for the router's count too."""
    router = cluster.start_router()
    await unload_under_streams(state, cluster, router, hide_running=True)

"""Load on demand through the real stack (scheduler, node, agent, router; the test
engine): a request for a catalog model nobody loaded is held, the model loads
once however many ask, and the request is answered; holding is bounded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.cluster import TEST_CATALOG, Cluster
from harness.processes import RouterProcess
from nebula.models import Status
from nebula.store import State

CATALOG = (
    TEST_CATALOG
    + """
[models.slow_start_chat]
model = "test/slow-start"
engine = "test"
cpu_memory_gib = 1
engine_args = ["--startup-delay-s", "3"]

[models.slower_start_chat]
model = "test/slower-start"
engine = "test"
cpu_memory_gib = 1
engine_args = ["--startup-delay-s", "8"]

[models.brief_chat]
model = "test/brief"
engine = "test"
cpu_memory_gib = 1
keep_alive = "1s"

[models.manual_chat]
model = "test/manual"
engine = "test"
cpu_memory_gib = 1
on_demand = false
"""
)
ON_DEMAND = {
    "NEBULA_ON_DEMAND": "true",
    "NEBULA_HOLD_KEEPALIVE_S": "0.5",
    "NEBULA_USAGE_FLUSH_S": "0.2",
}


@pytest.fixture
async def cluster(redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(redis_url, tmp_path, CATALOG, extra_env=ON_DEMAND)
    yield c
    c.close()


def chat_body(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream}


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, dict(r.headers), await r.read()


async def loads_of(state: State, model: str) -> list[str]:
    return [r.id for r in await state.requests.all() if r.model == model]


async def test_the_first_request_to_an_unloaded_model_is_held_and_answered(
    state: State, cluster: Cluster
) -> None:
    router = cluster.start_router()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        status, _, body = await post(session, router.url, chat_body("tiny_chat"))
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"]
        [request_id] = await loads_of(state, "tiny_chat")
        request = await state.requests.get(request_id)
        assert request.on_demand and request.keep_alive_s == 300  # NEBULA_KEEP_ALIVE's 5m

        # Streamed, on a model that takes 3 s to start: SSE comments keep the client
        # company, then the answer streams as usual.
        status, headers, body = await post(session, router.url, chat_body("slow_start_chat", True))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    text = body.decode()
    assert text.startswith(": waiting for model slow_start_chat to load\n\n"), text[:200]
    events = [e for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 2, text[-300:]
    assert "error" not in text


async def test_twenty_concurrent_first_requests_make_one_load(
    state: State, cluster: Cluster
) -> None:
    router = cluster.start_router()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        answers = await asyncio.gather(
            *(post(session, router.url, chat_body("tiny_chat", stream=i % 2 == 1))
              for i in range(20))
        )  # fmt: skip
    assert [status for status, _, _ in answers] == [200] * 20, answers[0]
    [request_id] = await loads_of(state, "tiny_chat")
    asked = [e for e in await state.requests.events(request_id) if "on demand" in e["message"]]
    assert len(asked) == 1


async def test_two_routers_holding_the_same_model_make_one_load(
    state: State, cluster: Cluster, tmp_path: Path
) -> None:
    routers = [RouterProcess(cluster.env["NEBULA_REDIS_URL"], tmp_path, **cluster.env)
               for _ in range(2)]  # fmt: skip
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            answers = await asyncio.gather(
                *(post(session, routers[i % 2].url, chat_body("slow_start_chat"))
                  for i in range(10))
            )  # fmt: skip
    finally:
        for router in routers:
            router.stop()
    assert [status for status, _, _ in answers] == [200] * 10, answers[0]
    assert len(await loads_of(state, "slow_start_chat")) == 1


async def test_an_idle_on_demand_model_unloads_after_its_keep_alive(
    state: State, cluster: Cluster
) -> None:
    router = cluster.start_router()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        status, _, body = await post(session, router.url, chat_body("brief_chat"))  # keep-alive 1s
        assert status == 200, body
        [request_id] = await loads_of(state, "brief_chat")
        await cluster.gone(state, request_id, timeout=30)
        # Asked again, it loads again.
        status, _, body = await post(session, router.url, chat_body("brief_chat"))
        assert status == 200, body


async def test_a_hold_past_its_timeout_is_503_with_retry_after_and_the_load_goes_on(
    state: State, cluster: Cluster
) -> None:
    router = cluster.start_router(NEBULA_HOLD_TIMEOUT_S="1")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        status, headers, body = await post(session, router.url, chat_body("slow_start_chat"))
        assert status == 503, body
        assert int(headers["Retry-After"]) > 0
        assert json.loads(body)["error"]["code"] == "model_loading"
        [request_id] = await loads_of(state, "slow_start_chat")
        await cluster.status(state, request_id, Status.READY, timeout=30)
        status, _, body = await post(session, router.url, chat_body("slow_start_chat"))
        assert status == 200, body


async def test_holds_over_the_queue_limit_are_429_with_retry_after(
    state: State, cluster: Cluster
) -> None:
    router = cluster.start_router(NEBULA_HOLD_QUEUE_LIMIT="2")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        answers = await asyncio.gather(
            *(post(session, router.url, chat_body("slow_start_chat")) for _ in range(6))
        )
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 200, 429, 429, 429, 429], answers
    refused = [(h, b) for s, h, b in answers if s == 429]
    assert all(int(h["Retry-After"]) > 0 for h, _ in refused)
    assert all(json.loads(b)["error"]["code"] == "model_loading_queue_full" for _, b in refused)


async def test_models_outside_the_catalog_or_not_on_demand_are_404_and_load_nothing(
    state: State, cluster: Cluster
) -> None:
    router = cluster.start_router()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for model in ("no_such_model", "manual_chat"):
            status, _, body = await post(session, router.url, chat_body(model))
            assert status == 404, body
            assert json.loads(body)["error"]["code"] == "model_not_found"
    await asyncio.sleep(1)
    assert await state.requests.all() == []


async def test_a_load_that_fails_answers_its_held_requests_with_the_reason(
    state: State, cluster: Cluster
) -> None:
    router = cluster.start_router(NEBULA_KEEP_ALIVE="2s")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
        status, headers, body = await post(session, router.url, chat_body("broken_chat"))
        assert status == 503, body
        error = json.loads(body)["error"]
        assert error["code"] == "model_load_failed" and "weights not found" in error["message"]
        assert "tries again" in error["message"] and 1 <= int(headers["Retry-After"]) <= 2

        [first] = await loads_of(state, "broken_chat")
        assert (await state.requests.get(first)).status is Status.FAILED
        # Requests meanwhile are told at once, without a load of their own.
        status, _, body = await post(session, router.url, chat_body("broken_chat"))
        assert status == 503 and json.loads(body)["error"]["code"] == "model_load_failed"

        # One keep-alive after it failed, the failed load is removed, and the next
        # request tries again: a new load (which fails the same way here).
        await cluster.gone(state, first)
        status, _, body = await post(session, router.url, chat_body("broken_chat"))
        assert status == 503 and "weights not found" in json.loads(body)["error"]["message"]
        [second] = await loads_of(state, "broken_chat")
        assert second != first
        # The scheduler's log says why the first went (its events went with it).
        log = (cluster.folder / "scheduler.log").read_text()
        assert f"{first} (Unloading): the load on demand failed" in log, log[-2000:]


async def test_a_held_request_whose_client_leaves_frees_its_hold(
    state: State, cluster: Cluster
) -> None:
    """Two clients hold the only two slots and leave: their slots are free at once, so
    the next two are held (not refused) and answered once the model is up."""
    router = cluster.start_router(NEBULA_HOLD_QUEUE_LIMIT="2")
    leaving = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=leaving) as session:
        for stream in (False, True):
            with pytest.raises(TimeoutError):
                await post(session, router.url, chat_body("slower_start_chat", stream))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        answers = await asyncio.gather(
            *(post(session, router.url, chat_body("slower_start_chat")) for _ in range(2))
        )
    assert [status for status, _, _ in answers] == [200, 200], answers
    assert len(await loads_of(state, "slower_start_chat")) == 1


async def test_a_held_stream_ends_with_router_stopped_when_the_drain_runs_out(
    state: State, cluster: Cluster
) -> None:
    """A stream held while its model loads, and the router stopped with a 1 s drain:
    the stream ends with the router_stopped error event, like a relayed one."""
    router = cluster.start_router(NEBULA_ROUTER_DRAIN_S="1")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        body = chat_body("slower_start_chat", stream=True)
        async with session.post(router.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            first = await r.content.readline()
            assert first.startswith(b": waiting for model"), first
            router.proc.terminate()
            rest = await r.content.read()
    assert b'"code": "router_stopped"' in rest, rest[-500:]
    assert router.proc.wait(10) == 0

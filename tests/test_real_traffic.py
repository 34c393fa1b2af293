"""What real clients and real engines do on an ordinary day, through the router over
real HTTP (a real redis-server, test engines as upstreams): clients that leave,
engines that answer errors in their own shape, replicas that cannot be reached,
stored values a reader cannot read, an engine key that appears late, and the
counts that must stay exact through all of it."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import clients
from harness.cluster import wait_for
from harness.endpoints import announce
from harness.processes import EngineProcess, RedisServer, RouterProcess, free_port, http_bytes, stop
from nebula import redis_keys
from nebula.agent.engine import running_requests
from nebula.exposure import key_file
from nebula.models import ApiKey, Endpoint
from nebula.settings import Settings
from nebula.store import State, endpoints

CHAT = "smollm2_135m_chat"
CLIENT_KEY = "sk-real-traffic"
ADMIN_KEY = "admin-real-traffic"
ENGINE_KEY = "engine-real-traffic"
# A prompt long enough for an answer of this many words (the test engine echoes it).
LONG_PROMPT = " ".join(f"w{i}" for i in range(600))

Engines = Callable[..., EngineProcess]


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Engines]:
    started: list[EngineProcess] = []

    def make(model: str = CHAT, *extra: str, key: str = ENGINE_KEY) -> EngineProcess:
        engine = EngineProcess(model, tmp_path, key, *extra)
        started.append(engine)
        return engine

    yield make
    for engine in started:
        stop(engine.proc)


@pytest.fixture
def routers(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    started: list[RouterProcess] = []

    def make(url: str = redis_url, **env: str) -> RouterProcess:
        settings = {
            "NEBULA_API_KEYS": CLIENT_KEY,
            "NEBULA_ADMIN_KEY": ADMIN_KEY,
            "NEBULA_ENGINE_API_KEY": ENGINE_KEY,
            "NEBULA_ROUTING_POLICY": "least_outstanding",
            "NEBULA_STATE_DIR": str(tmp_path / "router-state"),
            **env,
        }
        router = RouterProcess(url, tmp_path, **{k: v for k, v in settings.items() if v})
        started.append(router)
        return router

    yield make
    for router in started:
        assert router.stop() == 0
        assert ENGINE_KEY not in router.log.read_text(), "the engine key reached a log"


async def publish(state: State, url: str, placement_id: str, model: str = CHAT) -> None:
    await announce(
        state, Endpoint(placement_id, f"req-{model}", model, "test-node", url, task="chat")
    )


def served(router: RouterProcess) -> int:
    status, _, body = http_bytes("GET", router.url + "/health", timeout=5)
    return int(json.loads(body).get("endpoints", 0)) if status == 200 else -1


async def until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Wait for a blocking `check` (run in a thread) to hold."""
    return await wait_for(lambda: asyncio.to_thread(check), timeout, what)


def engine_requests(engine: EngineProcess) -> int:
    _, _, body = http_bytes("GET", engine.url + "/metrics", timeout=10)
    return running_requests(body.decode())


def metric(router: RouterProcess, name: str, **labels: str) -> float:
    """The sum of a router metric's samples whose labels include `labels`."""
    _, _, body = http_bytes("GET", router.url + "/metrics", key=CLIENT_KEY, timeout=10)
    total = 0.0
    for line in body.decode().splitlines():
        match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def chat(stream: bool = False, content: str = "hello", **extra: Any) -> dict[str, Any]:
    body = {"model": CHAT, "messages": [{"role": "user", "content": content}], "stream": stream}
    return {**body, **extra}


async def leave_after(url: str, body: dict[str, Any], seconds: float) -> None:
    await clients.leave_after(url, body, seconds, CLIENT_KEY)


async def test_a_client_that_leaves_stops_the_engines_work(
    state: State, routers: Callable[..., RouterProcess], engines: Engines
) -> None:
    """4 non-streamed and 4 streamed answers of 600 tokens (30 s each), abandoned
    after 1.5 s: the engine is idle long before they would have ended, and the router
    counts each once, as 499, with nothing left in flight."""
    engine = engines(CHAT, "--token-ms", "50", "--tokens", "600")
    router = routers()
    await publish(state, engine.url, "p-1")
    await until(lambda: served(router) == 1, "the endpoint")
    body = chat(content=LONG_PROMPT)
    left = time.monotonic()
    clients = [leave_after(router.url, {**body, "stream": s}, 1.5) for s in [False, True] * 4]
    await asyncio.gather(*clients)
    # Unanswered, they would run 30 s more; the engine must see every one of them go.
    await until(lambda: engine_requests(engine) == 0, "the engine to be idle", timeout=15)
    idle_s = time.monotonic() - left
    assert idle_s < 25, f"the engine went on for {idle_s:.1f}s"
    await until(
        lambda: metric(router, "nebula_router_requests_total", status="499") == 8,
        "8 requests counted as 499 (client closed)",
    )
    await until(lambda: metric(router, "nebula_router_in_flight", model=CHAT) == 0, "in-flight 0")
    # Nothing reported in flight for a drain to wait on.

    async def unreported() -> bool:
        return not await state.redis.zrange(redis_keys.ROUTER_IN_FLIGHT, 0, -1)

    await wait_for(unreported, 10, "the router's in-flight report gone")


async def test_a_router_reports_what_it_has_in_flight_for_drains(
    state: State, routers: Callable[..., RouterProcess], engines: Engines
) -> None:
    engine = engines(CHAT, "--token-ms", "100", "--tokens", "40")
    router = routers()
    await publish(state, engine.url, "p-1")
    await until(lambda: served(router) == 1, "the endpoint")
    body = chat(stream=True, content=LONG_PROMPT)
    streams = [asyncio.create_task(leave_after(router.url, body, 30)) for _ in range(3)]

    async def reported(count: int) -> bool:
        return await state.in_flight.to("p-1") == count

    await wait_for(lambda: reported(3), 10, "the router to report 3 requests in flight")
    assert await state.in_flight.to("p-other") == 0
    for task in streams:
        with pytest.raises(clients.AnsweredBeforeLeaving):
            await task
    await wait_for(lambda: reported(0), 10, "the report to go with the requests")


async def test_every_error_keeps_openai_shape(
    state: State, routers: Callable[..., RouterProcess], engines: Engines
) -> None:
    engine = engines()
    router = routers()
    await publish(state, engine.url, "p-1")
    await until(lambda: served(router) == 1, "the endpoint")
    url = router.url + "/v1/chat/completions"

    def shaped(status: int, body: bytes) -> dict[str, Any]:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"], body
        assert err["type"] and err["code"], body
        return err  # type: ignore[no-any-return]

    # A plain-text 500 from the engine (no other replica left): wrapped, 502.
    engine.behave(fail_status=500, fail_plain=True)
    status, headers, body = http_bytes("POST", url, chat(), CLIENT_KEY)
    assert status == 502 and headers["Content-Type"].startswith("application/json"), body
    err = shaped(status, body)
    assert err["code"] == "upstream_error" and "Internal Server Error" in err["message"]
    # A plain-text client error keeps its status.
    engine.behave(fail_status=422)
    engine.behave(fail_plain=True)
    status, _, body = http_bytes("POST", url, chat(), CLIENT_KEY)
    assert status == 422 and shaped(status, body)["code"] == "upstream_error"
    engine.behave(fail_status=None, fail_plain=False)

    # What vLLM refuses, the test engine refuses too, with a 400 in OpenAI's shape.
    status, _, body = http_bytes("POST", url, {"model": CHAT, "messages": "hi"}, CLIENT_KEY)
    assert status == 400 and "messages" in shaped(status, body)["message"]

    # A body nested past Python's recursion limit: a 400, on /v1 and on /admin.
    deep = b'{"model": "' + CHAT.encode() + b'", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    status, _, body = http_bytes("POST", url, raw=deep, key=CLIENT_KEY)
    assert status == 400 and shaped(status, body)["code"] == "invalid_json"
    status, _, body = http_bytes("POST", router.url + "/admin/models", raw=deep, key=ADMIN_KEY)
    assert status == 400, body
    assert "nested" in shaped(status, body)["message"]
    # And the router is still well.
    status, _, body = http_bytes("POST", url, chat(), CLIENT_KEY)
    assert status == 200, body


async def test_a_model_with_no_reachable_replica_answers_503_at_once(
    state: State, routers: Callable[..., RouterProcess]
) -> None:
    """Its only node died: the endpoints are still listed (until the scheduler withdraws
    them) but nothing answers. A 503 with Retry-After, like no replica at all; not 502."""
    router = routers()
    for i in range(2):
        await publish(state, f"http://127.0.0.1:{free_port()}", f"p-dead-{i}")
    await until(lambda: served(router) == 2, "the dead endpoints")
    for _ in range(3):
        status, headers, body = http_bytes(
            "POST", router.url + "/v1/chat/completions", chat(), CLIENT_KEY
        )
        assert status == 503, body
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"]["code"] == "no_healthy_replica"


async def test_streamed_usage_is_counted_exactly(
    state: State, routers: Callable[..., RouterProcess], engines: Engines
) -> None:
    """The engine's usage chunk and [DONE] arrive as separate reads (a step apart, as
    vLLM sends them): tokens are counted from the stream's tail, not its last read."""
    engine = engines(CHAT, "--token-ms", "20")
    router = routers()
    await publish(state, engine.url, "p-1")
    await until(lambda: served(router) == 1, "the endpoint")
    url = router.url + "/v1/chat/completions"
    usage_asked = chat(stream=True, content="one two three", stream_options={"include_usage": True})
    for _ in range(4):
        status, _, body = http_bytes("POST", url, usage_asked, CLIENT_KEY)
        assert status == 200 and b'"usage"' in body and body.rstrip().endswith(b"[DONE]")
    status, _, body = http_bytes("POST", url, chat(content="one two three"), CLIENT_KEY)
    assert status == 200
    _, _, text = http_bytes("GET", engine.url + "/metrics")
    sent = re.search(rb"vllm:generation_tokens_total\{[^}]*\} (\d+)", text)
    assert sent is not None
    generated = int(sent.group(1))
    assert generated == 5 * 4  # "echo: one two three", 4 words each
    counted = metric(router, "nebula_router_tokens_total", model=CHAT, kind="completion")
    assert counted == generated


async def test_one_unreadable_stored_value_never_stops_the_routing_table(
    state: State, routers: Callable[..., RouterProcess], engines: Engines
) -> None:
    """Garbage in the endpoint index, in the endpoint feed and among the API keys (a
    newer writer's, or damage): the router reads around it, keeps serving and stays
    healthy, and sees what is published after it."""
    engine = engines()
    await publish(state, engine.url, "p-good")
    index_keys = [redis_keys.ENDPOINT_INDEX, redis_keys.ENDPOINT_SEQ, redis_keys.ENDPOINT_FEED]
    change = [
        *index_keys,
        redis_keys.node_endpoints("n"),
        redis_keys.legacy_endpoint("x"),
        "nebula:none",
    ]
    await state.redis.eval(
        endpoints._CHANGE, 6, *change, "up", "p-garbage", "{not json", 100, "nebula:none"
    )
    await state.redis.hset(redis_keys.ENDPOINT_INDEX, "p-partial", json.dumps({"v": 9, "url": "x"}))
    await state.redis.hset(redis_keys.API_KEYS, "broken", "[1, 2")
    router = routers()  # its first, full read meets all of it
    await until(lambda: served(router) == 1, "the good endpoint")
    url = router.url + "/v1/chat/completions"
    assert http_bytes("POST", url, chat(), CLIENT_KEY)[0] == 200
    # More garbage through the feed, then a good change after it.
    await state.redis.eval(
        endpoints._CHANGE,
        6,
        *change,
        "up",
        "p-garbage-2",
        '{"model": 3}',
        100,
        redis_keys.EVENTS_CHANNEL,
    )
    second = engines()
    await publish(state, second.url, "p-good-2")
    await until(lambda: served(router) == 2, "the endpoint published after the garbage")
    status, _, body = http_bytes("GET", router.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok", body
    assert http_bytes("POST", url, chat(), CLIENT_KEY)[0] == 200
    # The admin views read around it too.
    status, _, body = http_bytes("GET", router.url + "/admin/cluster", key=ADMIN_KEY)
    assert status == 200, body
    # And a key created now is honoured.
    secret = await state.api_keys.create("late")
    await until(
        lambda: http_bytes("POST", url, chat(), secret)[0] == 200, "the key created after it"
    )
    assert isinstance(await state.api_keys.all(), list)
    assert all(isinstance(k, ApiKey) for k in await state.api_keys.all())


async def test_endpoints_kept_over_an_outage_are_checked_again(
    tmp_path: Path, routers: Callable[..., RouterProcess], engines: Engines
) -> None:
    """Redis goes away; the engine dies meanwhile; Redis comes back with the model
    still loaded but without the endpoint (its snapshot predates it; an agent could
    equally have withdrawn it before the router's first read). The router keeps the
    endpoint for the merge window (node_ttl_s), then reads it all again and drops it:
    nothing announces it any more."""
    server = RedisServer(tmp_path / "own-redis")
    server.start()
    try:
        state = State(server.url)
        await state.redis.hset(redis_keys.MODELS, CHAT, "req-chat")
        await state.redis.save()  # what Redis comes back with: the model, no endpoint
        engine = engines()
        await publish(state, engine.url, "p-1")
        await state.close()
        router = routers(server.url, NEBULA_NODE_TTL_S="4", NEBULA_HEARTBEAT_INTERVAL_S="0.5")
        await until(lambda: served(router) == 1, "the endpoint")
        server.stop()
        engine.kill()
        await until(lambda: "degraded" in http_bytes("GET", router.url + "/health")[2].decode(),
                    "the router to notice the outage")  # fmt: skip
        server.start()
        # Merged over the outage first: the table never goes blank because Redis is back.
        await until(lambda: "ok" in http_bytes("GET", router.url + "/health")[2].decode(),
                    "the router to read again")  # fmt: skip
        await until(lambda: served(router) == 0, "the endpoint kept over the outage to go")
    finally:
        server.stop()


async def test_a_router_started_before_its_node_finds_the_engine_key(
    state: State, tmp_path: Path, routers: Callable[..., RouterProcess], engines: Engines
) -> None:
    """No configured engine key and none kept yet: the router starts anyway; once the
    node makes its key, the router uses it without a restart."""
    engine = engines(CHAT, key="made-by-the-node")
    state_dir = tmp_path / "node-state"
    router = routers(NEBULA_ENGINE_API_KEY="", NEBULA_STATE_DIR=str(state_dir))
    await publish(state, engine.url, "p-1")
    await until(lambda: served(router) == 1, "the endpoint")
    url = router.url + "/v1/chat/completions"
    status, _, body = http_bytes("POST", url, chat(), CLIENT_KEY)
    assert status == 502 and b"engine key" in body, body
    path = key_file(Settings(state_dir=state_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("made-by-the-node\n")
    await until(lambda: http_bytes("POST", url, chat(), CLIENT_KEY)[0] == 200, "the key in use")


@pytest.fixture
async def two_workers(
    state: State, routers: Callable[..., RouterProcess], engines: Engines
) -> AsyncIterator[tuple[RouterProcess, EngineProcess]]:
    engine = engines(CHAT, "--token-ms", "30", "--tokens", "200")
    router = routers(NEBULA_ROUTER_WORKERS="2")
    await publish(state, engine.url, "p-1")
    await until(lambda: served(router) == 1, "the endpoint")
    yield router, engine


async def test_in_flight_counts_return_to_zero_across_workers(
    two_workers: tuple[RouterProcess, EngineProcess],
) -> None:
    """Answered, failed and abandoned requests over 2 workers: every count returns to
    zero, and the requests counter adds up to what was sent."""
    router, engine = two_workers
    url = router.url
    await asyncio.gather(*(leave_after(url, chat(s, LONG_PROMPT), 1.0) for s in (True, False)))
    answered = [
        asyncio.to_thread(http_bytes, "POST", url + "/v1/chat/completions", chat(), CLIENT_KEY)
        for _ in range(6)
    ]
    assert {r[0] for r in await asyncio.gather(*answered)} == {200}
    engine.behave(fail_status=503)
    failed = http_bytes("POST", url + "/v1/chat/completions", chat(), CLIENT_KEY)
    assert failed[0] == 503
    await until(lambda: metric(router, "nebula_router_in_flight") == 0, "in-flight 0")
    await until(lambda: engine_requests(engine) == 0, "the engine idle")
    assert metric(router, "nebula_router_requests_total", model=CHAT) == 9

"""Flow control over real HTTP: a real redis-server, routers as processes, test
engines that take a few requests at once and generate at a set pace, so that
saturation is real. Each test fails on the code before flow control (every
request went straight to the engine, whose FIFO decided who waited)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.cluster import wait_for
from harness.endpoints import announce
from harness.metrics import metric
from harness.processes import EngineProcess, RouterProcess, stop
from nebula.agent import load_report
from nebula.models import Endpoint
from nebula.store import State

CHAT = "tiny_chat"
ADMIN_KEY = "admin-flow"
ENGINE_KEY = "engine-flow"
WORDS = "one two three four five six seven eight nine ten eleven twelve"


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Callable[..., EngineProcess]]:
    started: list[EngineProcess] = []

    def make(*flags: str) -> EngineProcess:
        engine = EngineProcess(CHAT, tmp_path, ENGINE_KEY, *flags)
        started.append(engine)
        return engine

    yield make
    for engine in started:
        stop(engine.proc)


@pytest.fixture
def routers(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    started: list[RouterProcess] = []

    def make(**env: str) -> RouterProcess:
        router = RouterProcess(
            redis_url,
            tmp_path,
            NEBULA_ADMIN_KEY=ADMIN_KEY,
            NEBULA_ENGINE_API_KEY=ENGINE_KEY,
            NEBULA_API_KEYS="sk-bootstrap-flow",
            **env,
        )
        started.append(router)
        return router

    yield make
    for router in started:
        router.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def publish(state: State, engine: EngineProcess, target: int, pid: str = "p0") -> None:
    endpoint = Endpoint(pid, "r", CHAT, "node-flow", engine.url, "chat", max_concurrency=target)
    await announce(state, endpoint)


async def make_key(
    session: aiohttp.ClientSession, router: RouterProcess, name: str, priority: str
) -> str:
    async with session.post(
        router.url + "/admin/keys",
        json={"name": name, "priority": priority},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["key"])


async def ask(
    session: aiohttp.ClientSession,
    router: RouterProcess,
    key: str,
    max_tokens: int,
    stream: bool = False,
) -> tuple[int, dict[str, str], bytes, float]:
    """One chat request: (status, headers, body, seconds)."""
    body: dict[str, Any] = {
        "model": CHAT,
        "messages": [{"role": "user", "content": WORDS}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    started = time.monotonic()
    async with session.post(
        router.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        data = await r.read()
        return r.status, dict(r.headers), data, time.monotonic() - started


async def ready(session: aiohttp.ClientSession, router: RouterProcess, *keys: str) -> None:
    """The router serves the model and knows every key."""

    async def check() -> bool:
        for key in keys:
            status, _, _, _ = await ask(session, router, key, 1)
            if status != 200:
                return False
        return True

    await wait_for(check, 20, "the model served and the keys known")


async def loop_until(
    deadline: float, send: Callable[[], Any], out: list[tuple[float, int, float]]
) -> None:
    """Send one request after another until `deadline` (bounded); record each answer
    as (time it ended, status, seconds)."""
    while time.monotonic() < deadline:
        status, _, _, seconds = await send()
        out.append((time.monotonic(), status, seconds))


async def test_high_priority_waits_a_bounded_time_while_low_priority_fills_the_queue(
    state: State,
    engines: Callable[..., EngineProcess],
    routers: Callable[..., RouterProcess],
    session: aiohttp.ClientSession,
) -> None:
    # 2 slots, 8 words at 40 ms: about 0.3 s a request; the engine would take 16 at once.
    engine = engines("--max-num-seqs", "16", "--token-ms", "40")
    await publish(state, engine, target=2)
    router = routers()
    batch = await make_key(session, router, "batch", "low")
    chat = await make_key(session, router, "chat", "high")
    await ready(session, router, batch, chat)
    lows: list[tuple[float, int, float]] = []
    deadline = time.monotonic() + 8
    fillers = [
        asyncio.create_task(loop_until(deadline, lambda: ask(session, router, batch, 8), lows))
        for _ in range(16)
    ]
    await asyncio.sleep(2)  # the queue is full of batch requests by now
    highs = []
    for _ in range(5):
        status, _, _, seconds = await ask(session, router, chat, 8)
        assert status == 200
        highs.append(seconds)
    await asyncio.gather(*fillers)
    assert all(status == 200 for _, status, _ in lows)
    low_median = statistics.median(seconds for _, _, seconds in lows)
    # A high request waits for the next free slot only, never for the batch queue:
    # the batch requests wait for the 14 ahead of them, about 7 request times.
    assert max(highs) < low_median / 2, (highs, low_median)


async def test_two_keys_sending_ten_to_one_get_equal_shares(
    state: State,
    engines: Callable[..., EngineProcess],
    routers: Callable[..., RouterProcess],
    session: aiohttp.ClientSession,
) -> None:
    engine = engines("--max-num-seqs", "64", "--token-ms", "25")
    await publish(state, engine, target=2)
    router = routers()
    heavy = await make_key(session, router, "heavy", "normal")
    light = await make_key(session, router, "light", "normal")
    await ready(session, router, heavy, light)
    done: dict[str, list[tuple[float, int, float]]] = {"heavy": [], "light": []}
    started = time.monotonic()
    deadline = started + 8
    senders = [
        loop_until(deadline, lambda: ask(session, router, heavy, 8), done["heavy"])
        for _ in range(30)
    ] + [
        loop_until(deadline, lambda: ask(session, router, light, 8), done["light"])
        for _ in range(3)
    ]
    await asyncio.gather(*senders)
    # Served while both keys had requests waiting: from the first second to the deadline.
    served = {
        name: sum(1 for at, status, _ in answers if started + 1 < at <= deadline and status == 200)
        for name, answers in done.items()
    }
    assert all(status == 200 for answers in done.values() for _, status, _ in answers)
    assert served["light"] >= 20, served  # enough requests to say what a share is
    assert abs(served["heavy"] - served["light"]) <= 0.1 * max(served.values()) + 1, served


async def test_queue_limit_429_and_wait_timeout_503_shaped_with_retry_after(
    state: State,
    engines: Callable[..., EngineProcess],
    routers: Callable[..., RouterProcess],
    session: aiohttp.ClientSession,
) -> None:
    # One slot, and a request that holds it 12 s: everything else waits.
    engine = engines("--max-num-seqs", "16", "--token-ms", "1000")
    await publish(state, engine, target=1)
    router = routers(
        NEBULA_QUEUE_LIMIT="3", NEBULA_QUEUE_TIMEOUT_S="3", NEBULA_HOLD_KEEPALIVE_S="0.5"
    )
    low = await make_key(session, router, "low-key", "low")
    high = await make_key(session, router, "high-key", "high")
    engine.behave(token_ms=0)
    await ready(session, router, low, high)
    engine.behave(token_ms=1000)
    holder = asyncio.create_task(ask(session, router, low, 12))

    async def queued(n: int) -> bool:
        async with session.get(router.url + "/metrics") as r:
            text = await r.text()
        return metric(text, "nebula_router_queued_requests", band="low") == n

    async def running_one() -> bool:
        async with session.get(engine.url + "/metrics") as r:
            return load_report.parse(await r.text()).running == 1

    await wait_for(running_one, 10, "the slot taken")
    # Queued one after another, so that the newest is known.
    stream = asyncio.create_task(ask(session, router, low, 4, stream=True))
    await wait_for(lambda: queued(1), 10, "a low stream waiting")
    waiting = []
    for n in (2, 3):
        waiting.append(asyncio.create_task(ask(session, router, low, 4)))
        await wait_for(lambda n=n: queued(n), 10, f"{n} low requests waiting")  # type: ignore[misc]
    # Full: a fourth low request is refused at once...
    status, headers, body, _ = await ask(session, router, low, 4)
    assert status == 429, body
    assert b'"code": "queue_full"' in body or b'"code":"queue_full"' in body
    assert int(headers["Retry-After"]) >= 1
    # ...and a high one takes the place of the newest low one, which is refused.
    urgent = asyncio.create_task(ask(session, router, high, 4))
    pushed_out = await asyncio.wait_for(waiting[1], 10)
    assert pushed_out[0] == 429 and b"higher-priority" in pushed_out[2], pushed_out
    # Nobody gets the slot within the wait timeout: 503, shaped, with Retry-After.
    for task in (urgent, waiting[0]):
        status, headers, body, _ = await asyncio.wait_for(task, 15)
        assert status == 503 and b"queue_timeout" in body, body
        assert body.startswith(b'{"error"') and int(headers["Retry-After"]) >= 1
    # The stream was kept alive with comments, then told why in its own shape.
    status, headers, body, _ = await asyncio.wait_for(stream, 15)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert body.startswith(b": waiting for a free replica")
    assert b"queue_timeout" in body and b"data: {" in body
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)


async def test_two_routers_share_one_queue_rule(
    state: State,
    engines: Callable[..., EngineProcess],
    routers: Callable[..., RouterProcess],
    session: aiohttp.ClientSession,
) -> None:
    """A batch tenant saturates the model through one router; an interactive tenant's
    requests through another still go first, and the engine never gets more than
    the slots plus one report's overshoot."""
    engine = engines("--max-num-seqs", "64", "--token-ms", "40")
    await publish(state, engine, target=2)
    # The engine's load, reported as the node's agent does.
    reporter = asyncio.create_task(
        load_report.report_forever(state, session, "node-flow", lambda: {"p0": engine.url}, 0.2)
    )
    first, second = routers(), routers()
    try:
        batch = await make_key(session, first, "batch-2", "low")
        chat = await make_key(session, first, "chat-2", "high")
        await ready(session, first, batch)
        await ready(session, second, chat)
        peak = 0
        lows: list[tuple[float, int, float]] = []
        deadline = time.monotonic() + 9

        async def watch() -> None:
            nonlocal peak
            while time.monotonic() < deadline:
                async with session.get(engine.url + "/metrics") as r:
                    loads = load_report.parse(await r.text())
                peak = max(peak, loads.running + loads.waiting)
                await asyncio.sleep(0.05)

        fillers = [
            loop_until(deadline, lambda: ask(session, first, batch, 8), lows) for _ in range(12)
        ]
        background = asyncio.gather(watch(), *fillers)
        await asyncio.sleep(3)  # both routers have reported; the batch queue is long
        highs = []
        for _ in range(5):
            status, _, _, seconds = await ask(session, second, chat, 8)
            assert status == 200
            highs.append(seconds)
        await background
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    assert all(status == 200 for _, status, _ in lows)
    low_median = statistics.median(seconds for _, _, seconds in lows)
    assert max(highs) < low_median / 2, (highs, low_median)
    # Two slots; each router may fill what it saw free within one report: at most 4.
    assert 2 <= peak <= 4, peak

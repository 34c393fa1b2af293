"""Shared set-up for the fault tests: a Redis of their own (AOF on, so it can be
killed and restarted), a whole node and a router, and a steady load that counts
every failed request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from harness.cluster import TEST_CATALOG, Cluster, wait_for
from harness.processes import RedisServer, RouterProcess
from nebula.errors import StateUnavailable
from nebula.models import Phase, Status
from nebula.store import State

CLIENT_KEY = "sk-faults"
# An answer longer than a short drain: 40 chunks 200 ms apart.
LONG_CHAT = """
[models.long_chat]
model = "test/long-chat"
engine = "test"
cpu_memory_gib = 1
engine_args = ["--chunk-delay-ms", "200", "--tokens", "40"]
"""


@pytest.fixture
def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", aof=True)
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


@dataclass
class Node:
    cluster: Cluster
    router: RouterProcess
    state: State
    redis: RedisServer

    async def ready(self, model: str = "tiny_chat", replicas: int = 2) -> str:
        request = await self.cluster.load(self.state, model, replicas)
        await self.cluster.status(self.state, request.id, Status.READY, timeout=60)

        async def routed() -> bool:
            async with aiohttp.ClientSession() as s, s.get(self.router.url + "/health") as r:
                return (await r.json())["endpoints"] >= replicas

        await wait_for(routed, 20, "the router to see every replica")
        return request.id

    async def engine_pids(self) -> dict[str, int]:
        for attempt in range(5):  # the test's own connection may predate a Redis restart
            try:
                states = await self.state.placements.states("node-a")
                break
            except StateUnavailable:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.5)
        return {pid: s.pid for pid, s in states.items() if s.phase is Phase.HEALTHY and s.pid}


@pytest.fixture
async def node(own_redis: RedisServer, tmp_path: Path) -> AsyncIterator[Node]:
    cluster = Cluster(own_redis.url, tmp_path, catalog_text=TEST_CATALOG + LONG_CHAT)
    router = cluster.start_router(NEBULA_API_KEYS=CLIENT_KEY)
    state = State(own_redis.url)
    try:
        yield Node(cluster, router, state, own_redis)
    finally:
        await state.close()
        if own_redis.proc is None:
            own_redis.start()  # let the node's processes stop cleanly
        cluster.close()


@dataclass
class SteadyLoad:
    """Chat requests, streamed and not, `workers` at a time, until stopped; every
    answer that is not a complete 200 is a failure, with its reason kept."""

    url: str
    model: str = "tiny_chat"
    workers: int = 2
    pause_s: float = 0.03
    results: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _one(self, session: aiohttp.ClientSession, stream: bool) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "steady load"}],
            "stream": stream,
        }
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        try:
            async with session.post(
                self.url + "/v1/chat/completions", json=body, headers=headers
            ) as r:
                text = await r.text()
                complete = r.status == 200 and (
                    "data: [DONE]" in text if stream else bool(json.loads(text)["choices"])
                )
                if not complete:
                    self.failures.append(f"{time.strftime('%X')} {r.status} {text[:200]}")
                self.results[f"{r.status}{' stream' if stream else ''}"] += 1
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.failures.append(f"{time.strftime('%X')} {type(exc).__name__}: {exc}")
            self.results["error"] += 1

    async def _worker(self, n: int) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            i = n
            while not self._stop.is_set():
                await self._one(session, stream=i % 2 == 1)
                i += 1
                await asyncio.sleep(self.pause_s)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(n)) for n in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    @property
    def total(self) -> int:
        return sum(self.results.values())


@contextlib.asynccontextmanager
async def steady_load(url: str, **kwargs: object) -> AsyncIterator[SteadyLoad]:
    load = SteadyLoad(url, **kwargs)  # type: ignore[arg-type]
    load.start()
    try:
        yield load
    finally:
        await load.stop()

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from harness.processes import EngineProcess, RedisServer, StartEngines, stop
from nebula.settings import Settings
from nebula.store import State


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database per test."""
    if redis_server.proc is None:  # a test stopped it
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        node_id="test-node",
        heartbeat_interval_s=0.2,
        node_ttl_s=1.0,
        agent_restart_allowance_s=0.5,  # no agent restarts here: simulated nodes only
        scheduler_interval_s=0.2,
        leader_ttl_s=1.5,
        state_dir=tmp_path / "state",
    )


@pytest.fixture
async def state(redis_url: str) -> AsyncIterator[State]:
    s = State(redis_url, event_history=20)
    yield s
    await s.close()


@pytest.fixture
def start_engines(tmp_path: Path) -> Iterator[StartEngines]:
    """Start test engines (`start_engines(n, key, *flags)`); all are stopped after."""
    started: list[EngineProcess] = []

    def start(n: int, api_key: str, *flags: str) -> list[EngineProcess]:
        engines = [EngineProcess("chat", tmp_path, api_key, *flags) for _ in range(n)]
        started.extend(engines)
        return engines

    yield start
    for engine in started:
        stop(engine.proc)

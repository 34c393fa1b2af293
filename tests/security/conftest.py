"""Shared set-up for the security tests: a real redis-server (tests/conftest.py), the
router over real HTTP with every kind of key, and test engines as upstreams."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from harness.endpoints import announce
from harness.processes import EngineProcess, RouterProcess, stop
from nebula.models import Endpoint
from nebula.store import State

CHAT = "tiny_chat"
EMBED = "tiny_embedding"
CLIENT_KEY = "sk-client-8c41f0d2"
ADMIN_KEY = "admin-5b7e19aa"
READ_KEY = "reader-0c3d5e77"
ENGINE_KEY = "engine-7d2b9c11"
SECRETS = (CLIENT_KEY, ADMIN_KEY, READ_KEY, ENGINE_KEY)


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Callable[..., EngineProcess]]:
    started: list[EngineProcess] = []

    def make(model: str, *extra: str) -> EngineProcess:
        engine = EngineProcess(model, tmp_path, ENGINE_KEY, *extra)
        started.append(engine)
        return engine

    yield make
    for engine in started:
        stop(engine.proc)


def router_env(**extra: str) -> dict[str, str]:
    return {
        "NEBULA_API_KEYS": CLIENT_KEY,
        "NEBULA_ADMIN_KEY": ADMIN_KEY,
        "NEBULA_ADMIN_READ_KEYS": READ_KEY,
        "NEBULA_ENGINE_API_KEY": ENGINE_KEY,
        "NEBULA_LOG_LEVEL": "DEBUG",  # the most a log can say: still no secret
        **extra,
    }


@pytest.fixture
async def router(redis_url: str, tmp_path: Path) -> AsyncIterator[RouterProcess]:
    proc = RouterProcess(redis_url, tmp_path, **router_env())
    yield proc
    proc.stop()


async def publish(state: State, engine: EngineProcess, placement_id: str, task: str) -> None:
    fields = {
        "placement_id": placement_id,
        "request_id": f"req-{engine.model}",
        "model": engine.model,
        "node": "test-node",
        "url": engine.url,
        "task": task,
    }
    # Only the fields this Endpoint has: these tests also run against the code before
    # the fixes (to show that each one fails there).
    known = {k: v for k, v in fields.items() if k in Endpoint.__dataclass_fields__}
    await announce(state, Endpoint(**known))


def raw_http(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send `request` exactly as written (no client library normalises it) and read all."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])

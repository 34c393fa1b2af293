"""A whole single-machine cluster for tests: real Redis, scheduler, node (supervisord
and agent), and optionally a router, each in its own process."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from harness.processes import RouterProcess, spawn, stop
from nebula.agent.node import NodePaths
from nebula.catalog import Catalog, parse_catalog
from nebula.models import ModelRequest, Status
from nebula.settings import Settings
from nebula.store import State

T = TypeVar("T")
ENGINE_KEY = "engine-internal-key"

TEST_CATALOG = """
[models.tiny_chat]
model = "test/tiny-chat"
engine = "test"
cpu_memory_gib = 1

[models.slow_chat]
model = "test/slow-chat"
engine = "test"
cpu_memory_gib = 1
engine_args = ["--chunk-delay-ms", "300", "--tokens", "8"]

[models.broken_chat]
model = "test/broken"
engine = "test"
cpu_memory_gib = 1
engine_args = ["--fail-start", "OSError: boom, weights not found"]

[models.gpu_chat]
model = "test/needs-a-gpu"
engine = "test"
gpu_memory_utilization = 0.5

[models.tiny_embedding]
model = "test/tiny-embedding"
engine = "test"
task = "embedding"
cpu_memory_gib = 1
"""


def vllm_env(**more: str) -> dict[str, str]:
    """A test cluster's settings for real vLLM CPU engines: the prepared models, and
    the minutes a first start takes on a busy machine."""
    return {
        "NEBULA_MODELS_DIR": str(Settings().models_dir),
        "NEBULA_ENGINE_START_TIMEOUT_S": "900",
        **more,
    }


async def wait_for(
    check: Callable[[], Awaitable[T | None]], timeout: float = 20.0, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


class Cluster:
    def __init__(
        self,
        redis_url: str,
        folder: Path,
        catalog_text: str = TEST_CATALOG,
        extra_env: dict[str, str] | None = None,
        role_urls: dict[str, str] | None = None,
    ) -> None:
        """`role_urls`: a Redis URL of its own for the scheduler or the node (ACL users)."""
        role_urls = role_urls or {}
        self.folder = folder
        self.catalog_path = folder / "catalog.toml"
        self.catalog_path.write_text(catalog_text)
        self.catalog: Catalog = parse_catalog(catalog_text, str(self.catalog_path))
        # Below Linux's ephemeral range (32768+): there any outgoing connection may hold
        # an engine's port for a while, and the engine fails to bind it.
        base = random.randrange(20000, 32700, 100)
        self.env = {
            "NEBULA_REDIS_URL": redis_url,
            "NEBULA_NODE_ID": "node-a",
            "NEBULA_STATE_DIR": str(folder / "state"),
            "NEBULA_CATALOG_PATH": str(self.catalog_path),
            "NEBULA_HEARTBEAT_INTERVAL_S": "0.3",
            # Room for an agent restart (0.3 + the default 3 s allowance).
            "NEBULA_NODE_TTL_S": "4",
            "NEBULA_SCHEDULER_INTERVAL_S": "0.3",
            "NEBULA_LEADER_TTL_S": "3",
            "NEBULA_PROBE_INTERVAL_S": "0.3",
            "NEBULA_ROUTING_REFRESH_S": "0.2",
            "NEBULA_DRAIN_TIMEOUT_S": "15",
            "NEBULA_MAX_RESTARTS": "2",
            "NEBULA_MAX_REPLACEMENTS": "1",
            "NEBULA_REPLACEMENT_BACKOFF_S": "0.5",
            "NEBULA_ENGINE_PORT_MIN": str(base),
            "NEBULA_ENGINE_PORT_MAX": str(base + 49),
            "NEBULA_ENGINE_API_KEY": ENGINE_KEY,
            "NEBULA_ALLOW_TEST_ENGINE": "true",
            "NEBULA_LOG_LEVEL": "INFO",
            "NEBULA_SCHEDULER_METRICS_PORT": "0",
            "NEBULA_AGENT_METRICS_PORT": "0",
            **(extra_env or {}),
        }
        self.settings = Settings(redis_url=redis_url, node_id="node-a", state_dir=folder / "state")
        self.paths = NodePaths.of(self.settings)
        self.scheduler = spawn(
            [sys.executable, "-m", "nebula.daemons", "scheduler"],
            folder / "scheduler.log",
            {**self.env, "NEBULA_REDIS_URL": role_urls.get("scheduler", redis_url)},
        )
        self.node = spawn(
            [sys.executable, "-m", "nebula.daemons", "node"],
            folder / "node.log",
            {**self.env, "NEBULA_REDIS_URL": role_urls.get("node", redis_url)},
        )
        self.router: RouterProcess | None = None

    def start_router(self, **env: str) -> RouterProcess:
        self.router = RouterProcess(
            self.env["NEBULA_REDIS_URL"], self.folder, 1, **{**self.env, **env}
        )
        return self.router

    async def load(self, state: State, name: str, replicas: int = 1) -> ModelRequest:
        return await state.requests.create(self.catalog.get_spec(name), replicas)

    async def status(
        self, state: State, ref: str, status: Status, timeout: float = 20
    ) -> ModelRequest:
        async def check() -> ModelRequest | None:
            request = await state.requests.get(ref)
            return request if request.status is status else None

        return await wait_for(check, timeout, f"{ref} to be {status.value}")

    async def gone(self, state: State, ref: str, timeout: float = 30) -> None:
        async def check() -> bool:
            return ref not in {r.id for r in await state.requests.all()}

        await wait_for(check, timeout, f"{ref} to be gone")

    def agent_log(self) -> str:
        path = self.paths.logs / "agent.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        if self.router is not None:
            self.router.stop()
        stop(self.node, timeout=60)
        stop(self.scheduler)

"""What the agent does to one engine: observe it through supervisord and its health
probe, publish or withdraw its endpoint, and fail it with its log's last lines.
`service.Agent` decides which engines there are; this is each one's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

from nebula.agent import agent_metrics
from nebula.agent.engine import Engine, watch_start
from nebula.agent.programs import publishes_kv_events
from nebula.agent.supervisor import Supervisor
from nebula.models import Endpoint, Phase, Placement
from nebula.settings import Settings
from nebula.store import State

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 12
LOG_TAIL_CHARS = 1500


class Lifecycle:
    def __init__(
        self, state: State, settings: Settings, supervisor: Supervisor, wake: asyncio.Event
    ) -> None:
        self.state = state
        self.settings = settings
        self.sup = supervisor
        self.wake = wake  # set when an engine's state changes between passes
        self.node_id = settings.node_id
        self.session: aiohttp.ClientSession | None = None  # the agent's, once it runs

    async def observe(self, engine: Engine, info: dict[str, object] | None, now: float) -> None:
        if info is None:
            engine.phase, engine.message = Phase.STARTING, "waiting for supervisord"
            return
        statename = str(info.get("statename"))
        pid = int(info.get("pid") or 0) or None  # type: ignore[call-overload]
        if pid is not None and engine.pid is not None and pid != engine.pid:
            engine.restarts += 1
            engine.healthy_since = None
            log.warning("engine %s restarted (pid %s -> %s)", engine.name, engine.pid, pid)
        if pid is not None:
            engine.pid = pid
        if (
            engine.restarts
            and engine.healthy_since is not None
            and now - engine.healthy_since > self.settings.restart_decay_s
        ):
            # Healthy for a good while: old crashes no longer count towards Failed.
            log.info(
                "engine %s healthy for %.0fs: restart count reset",
                engine.name,
                now - engine.healthy_since,
            )
            engine.restarts = 0
        if statename == "FATAL":
            await self.fail(engine, f"could not start: {await self.tail(engine)}")
            return
        if engine.restarts > self.settings.max_restarts:
            await self.fail(
                engine, f"crashed {engine.restarts} times; last log: {await self.tail(engine)}"
            )
            return
        # STARTING too: supervisord says RUNNING only after startsecs, and an engine
        # that answers its health probe before that is up.
        healthy = statename in ("RUNNING", "STARTING") and await self.probe(engine)
        if healthy:
            engine.phase, engine.message = Phase.HEALTHY, "serving"
            engine.healthy_once = True
            if engine.healthy_since is None:
                engine.healthy_since = now
            await self.publish(engine)
            return
        engine.healthy_since = None
        if engine.published:
            await self.state.endpoints.withdraw(engine.placement.id, self.node_id)
            engine.published = False
            log.warning("engine %s failed its health probe; endpoint withdrawn", engine.name)
        waited = now - engine.first_seen
        if not engine.healthy_once and waited > self.settings.engine_start_timeout_s:
            await self.fail(
                engine, f"not healthy after {waited:.0f}s; last log: {await self.tail(engine)}"
            )
            return
        engine.phase = Phase.STARTING
        engine.message = f"{statename.lower()}, waiting for its health probe"
        if engine.watch is None and self.session is not None:
            url = self.url(engine.placement)
            engine.watch = asyncio.create_task(watch_start(engine, self.session, url, self.wake))

    def url(self, placement: Placement) -> str:
        return f"http://{self.settings.node_address}:{placement.port}"

    async def probe(self, engine: Engine) -> bool:
        assert self.session is not None
        started = time.perf_counter()
        try:
            async with self.session.get(self.url(engine.placement) + "/health") as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False
        finally:
            agent_metrics.PROBE_SECONDS.labels(self.node_id).observe(time.perf_counter() - started)

    async def publish(self, engine: Engine) -> None:
        """Once per healthy stretch (a dead node's are withdrawn by the scheduler)."""
        legacy = self.settings.legacy_endpoints
        if engine.published and not legacy:
            return
        p = engine.placement
        kv = publishes_kv_events(p, self.settings)
        url, task, target = self.url(p), p.spec.task.value, p.spec.concurrency_target(0)
        endpoint = Endpoint(p.id, p.request_id, p.model, self.node_id, url, task, kv, target)
        if legacy:  # every probe, for routers not yet upgraded
            await self.state.endpoints.publish_legacy(endpoint, self.settings.node_ttl_s)
        if engine.published:
            return
        await self.state.endpoints.publish(endpoint)
        log.info("engine %s healthy: endpoint %s published", engine.name, endpoint.url)
        engine.published = True

    async def tail(self, engine: Engine) -> str:
        tail = (await self.sup.tail(engine.name, LOG_TAIL_LINES)).strip() or "(the log is empty)"
        return tail[-LOG_TAIL_CHARS:]

    async def fail(self, engine: Engine, message: str) -> None:
        log.error("engine %s failed: %s", engine.name, message)
        engine.failed, engine.phase, engine.message = True, Phase.FAILED, message
        if engine.published:
            await self.state.endpoints.withdraw(engine.placement.id, self.node_id)
            engine.published = False
        # Stopped, and left stopped: a failed engine needs an operator (unload, fix, load).
        with contextlib.suppress(Exception):
            await self.sup.stop(engine.name)

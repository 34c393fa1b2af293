"""What the agent knows of one placement's engine, and how it drains one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from nebula.agent.programs import program_name
from nebula.agent.supervisor import Supervisor
from nebula.models import Phase, Placement, PlacementState
from nebula.settings import Settings
from nebula.store import State

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.25
# supervisord states in which an engine process may still be answering.
ALIVE = ("RUNNING", "STARTING", "STOPPING")
# A busy engine answers its metrics slowly: a drain waits this long for them (and
# then asks again) rather than read silence as "idle".
DRAIN_METRICS_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
START_POLL_S = 0.02
STARTING_PROBE_S = 0.1


@dataclass
class Engine:
    """What the agent knows of one placement's engine."""

    placement: Placement
    first_seen: float
    phase: Phase = Phase.STARTING
    message: str = "starting"
    pid: int | None = None
    restarts: int = 0
    failed: bool = False
    healthy_once: bool = False
    healthy_since: float | None = None  # start of the current healthy stretch
    published: bool = False
    retiring: asyncio.Task[None] | None = field(default=None, repr=False)
    watch: asyncio.Task[None] | None = field(default=None, repr=False)  # see watch_start

    @property
    def name(self) -> str:
        return program_name(self.placement.id)

    def report(self) -> PlacementState:
        return PlacementState(
            phase=self.phase, pid=self.pid, restarts=self.restarts, message=self.message
        )


def drain_timeout(placement: Placement, settings: Settings) -> float:
    """The unload's own timeout, else the catalog's for the model, else the node's."""
    for value in (placement.drain_timeout_s, placement.spec.drain_timeout_s):
        if value is not None:
            return float(value)
    return settings.drain_timeout_s


def running_requests(metrics_text: str) -> int:
    """Requests an engine is working on or holding, from vLLM's own metrics."""
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(metrics_text)
            if family.name in ("vllm:num_requests_running", "vllm:num_requests_waiting")
            for sample in family.samples
        )
    )


async def running(session: aiohttp.ClientSession, url: str) -> int | None:
    """Requests the engine at `url` is working on or holding (None: it did not say,
    in time or at all)."""
    try:
        async with session.get(url + "/metrics", timeout=DRAIN_METRICS_TIMEOUT) as r:
            if r.status != 200:
                return None
            return running_requests(await r.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


@dataclass
class Drain:
    """When an engine being retired has no request left: fail closed.

    Drained is "the engine process is gone", or "the engine said 0 and no router
    has a request in flight to it". A metrics page that does not come (a busy
    engine answers slowly), an error, or a router's report of work in flight is
    not drained: the wait goes on, up to the drain timeout."""

    session: aiohttp.ClientSession
    url: str
    placement_id: str
    gone: Callable[[], Awaitable[bool]]  # True once supervisord no longer runs it
    routers: Callable[[str], Awaitable[int]]  # requests routers have in flight to it
    why: str = "not checked yet"  # what the last check saw (for the timeout's log line)

    async def idle(self) -> bool:
        if await self.gone():
            return True
        count = await running(self.session, self.url)
        if count is None:
            self.why = "the engine did not report its requests"
            return False
        if count:
            self.why = f"the engine reports {count} request(s)"
            return False
        sent = await self.routers(self.placement_id)
        self.why = f"routers have {sent} request(s) in flight to it"
        return sent == 0

    async def wait(self, timeout_s: float) -> bool:
        """True once idle; False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.idle():
                return True
            await asyncio.sleep(DRAIN_POLL_S)
        return False


async def drain(
    engine: Engine,
    session: aiohttp.ClientSession,
    url: str,
    sup: Supervisor,
    state: State,
    settings: Settings,
) -> None:
    """Wait, up to the drain timeout, for a retiring engine's requests to finish."""
    name = engine.name

    async def gone() -> bool:
        info = (await sup.processes()).get(name)
        return info is None or str(info.get("statename")) not in ALIVE

    witness = Drain(session, url, engine.placement.id, gone, state.in_flight.to)
    timeout = drain_timeout(engine.placement, settings)
    if not await witness.wait(timeout):
        log.warning(
            "engine %s: drain timeout (%gs) reached, stopping with requests left (%s)",
            name,
            timeout,
            witness.why,
        )


async def watch_start(
    engine: Engine, session: aiohttp.ClientSession, url: str, wake: asyncio.Event
) -> None:
    """Poll a starting engine's /health every START_POLL_S and wake the converge loop
    at its first good answer: Ready (and held requests) follow within milliseconds,
    not a converge pass later. Ends when the engine is no longer starting."""
    try:
        while engine.phase is Phase.STARTING and engine.retiring is None and not engine.failed:
            try:
                async with session.get(url + "/health") as r:
                    if r.status == 200:
                        wake.set()
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(START_POLL_S)
    finally:
        engine.watch = None


def probe_interval(engines: Iterable[Engine], settled_s: float) -> float:
    """Between converge passes: short while an engine is on its way up (its start
    shows soon), `settled_s` (probe_interval_s) otherwise."""
    starting = any(e.phase is Phase.STARTING and e.retiring is None for e in engines)
    return min(settled_s, STARTING_PROBE_S) if starting else settled_s

"""What the agent knows of one placement's engine, and how it drains one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from nebula.agent.programs import program_name
from nebula.models import Phase, Placement, PlacementState
from nebula.settings import Settings

DRAIN_POLL_S = 0.25
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
    """Requests the engine at `url` is working on or holding (None: it does not say)."""
    try:
        async with session.get(url + "/metrics") as r:
            if r.status != 200:
                return None
            return running_requests(await r.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def drained(session: aiohttp.ClientSession, url: str, timeout_s: float) -> bool:
    """Wait until the engine at `url` has no request left (or is gone); False if
    `timeout_s` passed first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not await running(session, url):  # none left, or the engine is gone
            return True
        await asyncio.sleep(DRAIN_POLL_S)
    return False


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

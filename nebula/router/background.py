"""The tasks each router process runs beside its requests: the routing table's
refresher, the in-flight gauges and reports, the engines' load, flow control's
shares, the metrics advertisement, Redis's health, last use and token usage, the
prefix index's feed. Started before the first request, stopped (bounded) after
the last."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from nebula import redis_health
from nebula.errors import NebulaError
from nebula.exporter import advertise
from nebula.loops import every
from nebula.process import STOP_STEP_S, bounded
from nebula.router import prefix_feed
from nebula.router.accounting import Ledger
from nebula.router.ondemand import OnDemand, UsageRecorder
from nebula.router.proxy import Proxy
from nebula.router.table import RoutingTable
from nebula.settings import Settings
from nebula.store import State

log = logging.getLogger(__name__)

# The in-flight sampler's period, and how long a router's in-flight report outlives it.
SAMPLE_S = 1.0
IN_FLIGHT_TTL_S = 5 * SAMPLE_S


async def report_in_flight(state: State, instance: str, proxy: Proxy, reported: bool) -> bool:
    """Tell drains what this process has in flight to each replica (see
    store/inflight.py); True while a report is stored. Nothing to say, and nothing
    said before: no write."""
    if not proxy.inflight and not reported:
        return False
    try:
        await state.in_flight.report(instance, proxy.inflight, IN_FLIGHT_TTL_S)
    except NebulaError as exc:
        log.debug("reporting requests in flight: %s", exc.message)
        return reported
    return bool(proxy.inflight)


async def sample_engine_load(state: State, table: RoutingTable, proxy: Proxy) -> None:
    """Take what the engines last reported of their load into the load bound."""
    try:
        loads = await state.engine_load.of(e.node for e in table.by_id.values())
    except NebulaError as exc:
        log.debug("reading the engines' load: %s", exc.message)
        return
    proxy.forwarder.loads.sampled({pid: x.running + x.waiting for pid, x in loads.items()})
    if proxy.flow is not None:
        proxy.flow.engines_waiting = {pid: x.waiting for pid, x in loads.items() if x.waiting}


async def share_slots(state: State, instance: str, proxy: Proxy) -> None:
    """Report this process's demand, read everyone's, take its share of the slots
    (router/flow_share.py). Without Redis, each process goes on with all the slots:
    the engines' own queues take the excess, and no process starves."""
    if proxy.flow is None:
        return
    try:
        await state.demand.report(instance, proxy.flow.demand())
        everyone = await state.demand.all()
    except NebulaError as exc:
        log.debug("sharing flow-control slots: %s", exc.message)
        proxy.flow.forget_others()
        proxy.forwarder.alone = False
        return
    proxy.flow.shared(everyone, instance)
    proxy.forwarder.alone = everyone.keys() <= {instance}


@dataclass
class Background:
    """One router process's tasks, around the parts they keep current."""

    settings: Settings
    state: State
    table: RoutingTable
    proxy: Proxy
    ondemand: OnDemand
    usage: UsageRecorder
    ledger: Ledger
    # This process, as other routers see it.
    instance: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp's cleanup context: start, serve, stop."""
        await self.table.refresh(self.state)
        self._start()
        yield
        await bounded("stopping the router's tasks", self._stop(), STOP_STEP_S)

    def _start(self) -> None:
        settings, state = self.settings, self.state
        host = (
            settings.node_address
            if settings.router_host in ("0.0.0.0", "::")
            else settings.router_host
        )
        address = f"{host}:{settings.router_port}"
        beat = settings.heartbeat_interval_s
        loops = {
            "routing-table": self.table.keep_fresh(state, settings.routing_refresh_s),
            "in-flight-sampler": self._sample(),
            "in-flight-reporter": self._report(),
            "metrics-advertiser": advertise(state, "router", address, address, beat),
            "redis-health": redis_health.watch(state, beat),
            "last-use": self.usage.run(),
            "token-usage": self.ledger.run(),
        }
        if self.proxy.forwarder.prefix is not None:
            loops["prefix-feed"] = prefix_feed.share(
                state, self.proxy.forwarder.prefix, self.instance
            )
        self.tasks = [asyncio.create_task(loop, name=name) for name, loop in loops.items()]

    async def _sample(self) -> None:
        async def sample() -> None:
            self.proxy.sample_in_flight()
            self.proxy.forwarder.refresh_engine_key()

        await every("in-flight sampler", SAMPLE_S, sample)

    async def _report(self) -> None:
        # Its own task: a Redis that hangs delays the report, never the gauges.
        reported = False

        async def report() -> None:
            nonlocal reported
            reported = await report_in_flight(self.state, self.instance, self.proxy, reported)
            await sample_engine_load(self.state, self.table, self.proxy)
            await share_slots(self.state, self.instance, self.proxy)

        await every("in-flight reporter", SAMPLE_S, report)

    async def _stop(self) -> None:
        await self.ondemand.close()
        for task in self.tasks:
            task.cancel()
        # All at once, and bounded: a task that waits on a peer (a TLS close) must
        # not hold up the rest.
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=STOP_STEP_S / 2)
        await self.ledger.flush()  # the last second's usage
        with contextlib.suppress(NebulaError):  # others take its slots at once
            await self.state.demand.remove(self.instance)
        await self.proxy.stop()
        await self.state.close()

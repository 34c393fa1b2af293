"""The node agent: converge this node's engines to its placements, and report.

Level-triggered, like the scheduler: each pass reads the node's placements
and supervisord's processes, writes or removes program files, probes every
engine's health, publishes an endpoint only while its engine answers (and
withdraws it on the first failed probe), and reports what it saw. A pass
wakes on this node's pub/sub channel or every `probe_interval_s`.

An agent restart does not touch the engines: supervisord runs them, the
program files are unchanged, so the new agent adopts them with their PIDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

import aiohttp

from nebula import kv_events, redis_health, redis_keys
from nebula.agent import agent_metrics, kv_watch, load_report
from nebula.agent.engine import Engine, drain, probe_interval
from nebula.agent.lifecycle import Lifecycle
from nebula.agent.programs import engine_program, program_name, publishes_kv_events
from nebula.agent.supervisor import Supervisor, SupervisorUnavailable
from nebula.agent.telemetry import Telemetry
from nebula.agent.vetting import node_catalog, vet
from nebula.catalog import Catalog
from nebula.errors import InvalidRequest, NebulaError, StateUnavailable
from nebula.exporter import advertise, serve_metrics
from nebula.loops import every, jittered, reconcile_forever, run_loops
from nebula.models import Desired, Phase, Placement, PlacementState
from nebula.settings import Settings
from nebula.store import State

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        state: State,
        settings: Settings,
        supervisor: Supervisor,
        telemetry: Telemetry | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.state = state
        self.catalog = catalog or node_catalog(settings)  # what this node may run
        self.settings = settings
        self.sup = supervisor
        self.telemetry = telemetry or Telemetry()
        self.node_id = settings.node_id
        self.engines: dict[str, Engine] = {}
        self.stopped: set[str] = set()  # placements whose engine is gone, until their deletion
        self.reported: dict[str, PlacementState] = {}
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._redis_lost = False  # set by a failed Redis call, cleared by a heartbeat
        self._epoch = 0  # the state store's master epoch last announced to
        self._resync = True  # withdraw endpoints no engine here serves (see converge)
        self.life = Lifecycle(state, settings, supervisor, self._wake)

    async def run(self) -> None:
        log.info("agent for node %s starting", self.node_id)
        probe_timeout = max(0.5, min(2.0, self.settings.probe_interval_s))
        self._session = session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=probe_timeout)
        )
        self.life.session = session
        kv_events.socket_dir().mkdir(mode=0o700, exist_ok=True)  # before any engine binds
        try:
            await self._restore()
            address = serve_metrics(
                self.settings.metrics_address,
                self.settings.agent_metrics_port,
                "NEBULA_AGENT_METRICS_PORT",
                "agent",
            )
            probe = self.settings.probe_interval_s
            await run_loops(
                {
                    "heartbeat": self._heartbeat_loop,
                    "converge": lambda: reconcile_forever(
                        "converge",
                        self.converge,
                        wake=self._wake,
                        on_error=self._converge_failed,
                        interval=lambda: probe_interval(self.engines.values(), probe),
                        listen=(self.state, redis_keys.node_channel(self.node_id)),
                    ),
                    "advertise": lambda: advertise(
                        self.state,
                        "agent",
                        self.node_id,
                        address,
                        self.settings.heartbeat_interval_s,
                    ),
                    "redis-health": lambda: redis_health.watch(
                        self.state, self.settings.heartbeat_interval_s
                    ),
                    "engine-load": lambda: load_report.report_forever(
                        self.state, session, self.node_id, self._published, probe
                    ),
                    "kv-events": lambda: kv_watch.watch_engines(self.state, self._kv_publishers),
                }
            )
        finally:
            for engine in self.engines.values():
                for task in (engine.retiring, engine.watch):
                    if task is not None:
                        task.cancel()
            await self._session.close()

    async def _heartbeat_loop(self) -> None:
        # Never dies (`every`): a node whose heartbeat stops is dead, its replicas moved.
        await every(
            "heartbeat", lambda: jittered(self.settings.heartbeat_interval_s), self._heartbeat
        )

    async def _heartbeat(self) -> None:
        try:
            node = await asyncio.to_thread(self.telemetry.sample, self.settings)
            agent_metrics.record_node(node)
            await self.state.nodes.heartbeat(node, self.settings.node_ttl_s)
            if self._redis_lost or self._epoch != self.state.master_epoch:
                self._epoch = self.state.master_epoch
                self._back_from_outage()
        except StateUnavailable as exc:
            # The engines keep running: nothing on this node needs Redis to serve.
            if not self._redis_lost:
                log.warning("heartbeat: %s; engines keep running", exc.message)
            self._redis_lost = True

    def _back_from_outage(self) -> None:
        """Redis is back (perhaps a new one, from its AOF): announce every endpoint again,
        at once, so routers see them before the ones they remember lapse."""
        self._redis_lost = False
        log.info("state store reachable again; re-announcing this node's endpoints and states")
        for engine in self.engines.values():
            engine.published = False
        self._resync = True
        # Reports written just before the outage may be lost with it: write them all.
        self.reported.clear()
        self._wake.set()

    def _converge_failed(self, exc: NebulaError) -> None:
        # Redis or supervisord away: the engines keep running; the next pass retries.
        if isinstance(exc, StateUnavailable):
            if self._redis_lost:
                return
            self._redis_lost = True
        log.warning("converge: %s", exc.message)

    async def _restore(self) -> None:
        """Carry restart counts and failures over an agent restart."""
        with contextlib.suppress(StateUnavailable):
            self.reported = await self.state.placements.states(self.node_id)

    # ---------------------------------------------------------------- converge

    async def converge(self) -> None:
        now = time.time()
        read = await self.state.placements.read_node(self.node_id)
        placements = {p.id: p for p in read.placements}
        unreadable = read.unreadable  # left as they are: neither started nor stopped
        self._adopt(placements, unreadable, now)
        await self._retire_unwanted(placements, unreadable)
        wanted = [
            e
            for e in self.engines.values()
            if e.retiring is None and e.placement.desired is Desired.RUN and not e.failed
        ]
        processes = await self._write_programs(wanted)
        await asyncio.gather(
            *(self.life.observe(e, processes.get(e.name), now) for e in wanted if not e.failed)
        )
        if self._resync:
            # After a start or an outage: withdrawals this agent (or its predecessor)
            # could not write are written now; what serves is published again above.
            live = {pid for pid, e in self.engines.items() if e.published}
            if await self.state.endpoints.retain(self.node_id, live):
                log.info("withdrew this node's stale endpoints")
            self._resync = False
        await self._report()

    def _adopt(self, placements: dict[str, Placement], unreadable: set[str], now: float) -> None:
        """An engine for every placement (carrying restarts and failures over an agent
        restart), each with its placement as it is now."""
        self.stopped &= placements.keys() | unreadable
        for pid, p in placements.items():
            if pid in self.stopped:
                continue
            engine = self.engines.get(pid)
            if engine is None:
                engine = self.engines[pid] = Engine(placement=p, first_seen=now)
                previous = self.reported.get(pid)
                if previous is not None:
                    engine.restarts = previous.restarts
                    if previous.phase is Phase.FAILED:
                        engine.failed, engine.phase = True, Phase.FAILED
                        engine.message = previous.message
            engine.placement = p

    async def _retire_unwanted(
        self, placements: dict[str, Placement], unreadable: set[str]
    ) -> None:
        """Engines nobody wants any more: drain and stop, one task each; and programs
        that no engine here owns (left by an agent before a crash): removed."""
        for pid, engine in self.engines.items():
            if pid in unreadable:
                continue
            unwanted = pid not in placements or engine.placement.desired is Desired.STOP
            if unwanted and engine.retiring is None:
                engine.retiring = asyncio.create_task(
                    self._retire(engine, report=pid in placements), name=f"retire-{pid}"
                )
        known = {program_name(pid) for pid in self.engines.keys() | unreadable}
        for name in self.sup.files() - known:
            log.info("removing orphan engine program %s", name)
            await self.sup.remove(name)
            self.sup.delete(name)

    async def _write_programs(self, wanted: list[Engine]) -> dict[str, dict[str, object]]:
        """Each wanted engine's program, vetted against this node's catalog, written
        and added to supervisord; its processes as supervisord reports them."""
        changed = False
        ours: set[str] = set()  # the programs this pass wrote: the only ones it adds
        for engine in wanted:
            try:
                vet(engine.placement.spec, self.catalog)
                program = engine_program(engine.placement, self.settings)
                changed |= self.sup.write(program, self.settings.max_restarts)
            except InvalidRequest as exc:
                await self.life.fail(engine, exc.message)
                continue
            ours.add(program.name)
        strangers = await self.sup.apply(ours) if changed else []
        if strangers:
            log.error(
                "supervisord reports programs the agent did not write: %s; not starting them",
                ", ".join(strangers),
            )
        processes = await self.sup.processes()
        for engine in wanted:
            if engine.name not in processes and not engine.failed:
                await self.sup.add(engine.name)  # a file supervisord has not loaded yet
        return processes

    def _published(self) -> dict[str, str]:
        return {pid: self.life.url(e.placement) for pid, e in self.engines.items() if e.published}

    def _kv_publishers(self) -> set[str]:
        engines = [e for e in self.engines.values() if e.published]
        return {e.placement.id for e in engines if publishes_kv_events(e.placement, self.settings)}

    async def _report(self) -> None:
        agent_metrics.record_engines(
            self.node_id,
            {
                pid: (e.placement.model, e.phase, e.restarts)
                for pid, e in self.engines.items()
                if pid not in self.stopped
            },
        )
        changes = {}
        for pid, engine in self.engines.items():
            if pid in self.stopped:
                continue
            now = engine.report()
            before = self.reported.get(pid)
            # Write only what changed (the timestamp alone is no change).
            if before is None or replace(now, updated_at=before.updated_at) != before:
                changes[pid] = replace(now, updated_at=time.time())
        if changes:
            await self.state.placements.report(self.node_id, changes)
            self.reported.update(changes)

    # ------------------------------------------------------------------ unload

    async def _retire(self, engine: Engine, *, report: bool) -> None:
        """Withdraw the endpoint, let in-flight requests finish, stop, clean up, report."""
        pid, name = engine.placement.id, engine.name
        try:
            engine.phase, engine.message = Phase.STOPPING, "draining"
            if report:
                await self._report()
            await self.state.endpoints.withdraw(pid, self.node_id)
            engine.published = False
            if engine.healthy_once and not engine.failed:
                # Routers drop the endpoint on the withdrawal event; the wait covers one
                # that polls instead.
                await asyncio.sleep(self.settings.routing_refresh_s)
                assert self._session is not None
                url = self.life.url(engine.placement)
                await drain(engine, self._session, url, self.sup, self.state, self.settings)
            await self.sup.remove(name)
            self.sup.delete(name)
            engine.phase, engine.message, engine.pid = Phase.STOPPED, "stopped", None
            if report:
                self.stopped.add(pid)
                await self.state.placements.report(
                    self.node_id, {pid: PlacementState(Phase.STOPPED, updated_at=time.time())}
                )
            else:
                await self.state.placements.report(self.node_id, {}, drop=[pid])
            log.info("engine %s stopped and removed", name)
            del self.engines[pid]
            self.reported.pop(pid, None)
        except (StateUnavailable, SupervisorUnavailable) as exc:
            # Try again on a later pass.
            log.warning("retiring %s: %s; retrying", name, exc.message)
            engine.retiring = None
            self._wake.set()
        except Exception:
            # Whatever went wrong, the next pass tries again: an unload never sticks.
            log.exception("retiring %s failed; retrying", name)
            engine.retiring = None
            await asyncio.sleep(self.settings.probe_interval_s)
            self._wake.set()

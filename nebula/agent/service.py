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

from nebula import keys, kv_events, redis_health
from nebula.agent import agent_metrics, kv_watch, load_report
from nebula.agent.engine import Engine, drain, probe_interval, watch_start
from nebula.agent.programs import engine_program, program_name, publishes_kv_events
from nebula.agent.supervisor import Supervisor, SupervisorUnavailable
from nebula.agent.telemetry import Telemetry
from nebula.agent.vetting import node_catalog, vet
from nebula.catalog import Catalog
from nebula.errors import InvalidRequest, NebulaError, StateUnavailable
from nebula.exporter import advertise, serve_metrics
from nebula.loops import jittered, reconcile_forever, run_loops
from nebula.models import Desired, Endpoint, Phase, Placement, PlacementState
from nebula.settings import Settings
from nebula.store import State

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 12
LOG_TAIL_CHARS = 1500


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

    async def run(self) -> None:
        log.info("agent for node %s starting", self.node_id)
        probe_timeout = max(0.5, min(2.0, self.settings.probe_interval_s))
        self._session = session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=probe_timeout)
        )
        kv_events.socket_dir().mkdir(mode=0o700, exist_ok=True)  # before any engine binds
        try:
            await self._restore()
            address = serve_metrics(self.settings.metrics_address,
                                    self.settings.agent_metrics_port,
                                    "NEBULA_AGENT_METRICS_PORT", "agent")  # fmt: skip
            probe = self.settings.probe_interval_s
            await run_loops(
                {
                    "heartbeat": self._heartbeat_loop,
                    "converge": lambda: reconcile_forever(
                        "converge", self.converge, wake=self._wake, on_error=self._converge_failed,
                        interval=lambda: probe_interval(self.engines.values(), probe),
                        listen=(self.state, keys.node_channel(self.node_id)),
                    ),
                    "advertise": lambda: advertise(
                        self.state, "agent", self.node_id, address,
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
            )  # fmt: skip
        finally:
            for engine in self.engines.values():
                for task in (engine.retiring, engine.watch):
                    if task is not None:
                        task.cancel()
            await self._session.close()

    async def _heartbeat_loop(self) -> None:
        while True:
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
            except Exception:
                # Never dies: a node whose heartbeat stops is dead, its replicas moved.
                log.exception("heartbeat failed; retrying")
            await asyncio.sleep(jittered(self.settings.heartbeat_interval_s))

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

        # Engines nobody wants any more: drain and stop, one task each.
        for pid, engine in self.engines.items():
            if pid in unreadable:
                continue
            unwanted = pid not in placements or engine.placement.desired is Desired.STOP
            if unwanted and engine.retiring is None:
                engine.retiring = asyncio.create_task(
                    self._retire(engine, report=pid in placements), name=f"retire-{pid}"
                )
        known = {program_name(pid) for pid in self.engines.keys() | unreadable}
        for name in self.sup.files() - known:  # left by an agent before a crash
            log.info("removing orphan engine program %s", name)
            await self.sup.remove(name)
            self.sup.delete(name)

        wanted = [
            e
            for e in self.engines.values()
            if e.retiring is None and e.placement.desired is Desired.RUN and not e.failed
        ]
        changed = False
        ours: set[str] = set()  # the programs this pass wrote: the only ones it adds
        for engine in wanted:
            try:
                vet(engine.placement.spec, self.catalog)
                program = engine_program(engine.placement, self.settings)
                changed |= self.sup.write(program, self.settings.max_restarts)
            except InvalidRequest as exc:
                await self._fail(engine, exc.message)
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
        await asyncio.gather(
            *(self._observe(e, processes.get(e.name), now) for e in wanted if not e.failed)
        )
        if self._resync:
            # After a start or an outage: withdrawals this agent (or its predecessor)
            # could not write are written now; what serves is published again above.
            live = {pid for pid, e in self.engines.items() if e.published}
            if await self.state.endpoints.retain(self.node_id, live):
                log.info("withdrew this node's stale endpoints")
            self._resync = False
        await self._report()

    async def _observe(self, engine: Engine, info: dict[str, object] | None, now: float) -> None:
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
            log.info("engine %s healthy for %.0fs: restart count reset", engine.name,
                     now - engine.healthy_since)  # fmt: skip
            engine.restarts = 0
        if statename == "FATAL":
            await self._fail(engine, f"could not start: {await self._tail(engine)}")
            return
        if engine.restarts > self.settings.max_restarts:
            await self._fail(
                engine, f"crashed {engine.restarts} times; last log: {await self._tail(engine)}"
            )
            return
        # STARTING too: supervisord says RUNNING only after startsecs, and an engine
        # that answers its health probe before that is up.
        healthy = statename in ("RUNNING", "STARTING") and await self._probe(engine)
        if healthy:
            engine.phase, engine.message = Phase.HEALTHY, "serving"
            engine.healthy_once = True
            if engine.healthy_since is None:
                engine.healthy_since = now
            await self._publish(engine)
            return
        engine.healthy_since = None
        if engine.published:
            await self.state.endpoints.withdraw(engine.placement.id, self.node_id)
            engine.published = False
            log.warning("engine %s failed its health probe; endpoint withdrawn", engine.name)
        waited = now - engine.first_seen
        if not engine.healthy_once and waited > self.settings.engine_start_timeout_s:
            await self._fail(
                engine, f"not healthy after {waited:.0f}s; last log: {await self._tail(engine)}"
            )
            return
        engine.phase = Phase.STARTING
        engine.message = f"{statename.lower()}, waiting for its health probe"
        if engine.watch is None and self._session is not None:
            url = self._url(engine.placement)
            engine.watch = asyncio.create_task(watch_start(engine, self._session, url, self._wake))

    def _published(self) -> dict[str, str]:
        return {pid: self._url(e.placement) for pid, e in self.engines.items() if e.published}

    def _kv_publishers(self) -> set[str]:
        engines = [e for e in self.engines.values() if e.published]
        return {e.placement.id for e in engines if publishes_kv_events(e.placement, self.settings)}

    def _url(self, placement: Placement) -> str:
        return f"http://{self.settings.node_address}:{placement.port}"

    async def _probe(self, engine: Engine) -> bool:
        assert self._session is not None
        started = time.perf_counter()
        try:
            async with self._session.get(self._url(engine.placement) + "/health") as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False
        finally:
            agent_metrics.PROBE_SECONDS.labels(self.node_id).observe(time.perf_counter() - started)

    async def _publish(self, engine: Engine) -> None:
        """Once per healthy stretch (a dead node's are withdrawn by the scheduler)."""
        legacy = self.settings.legacy_endpoints
        if engine.published and not legacy:
            return
        p = engine.placement
        kv = publishes_kv_events(p, self.settings)
        url, task, target = self._url(p), p.spec.task.value, p.spec.concurrency_target(0)
        endpoint = Endpoint(p.id, p.request_id, p.model, self.node_id, url, task, kv, target)
        if legacy:  # every probe, for routers not yet upgraded
            await self.state.endpoints.publish_legacy(endpoint, self.settings.node_ttl_s)
        if engine.published:
            return
        await self.state.endpoints.publish(endpoint)
        log.info("engine %s healthy: endpoint %s published", engine.name, endpoint.url)
        engine.published = True

    async def _tail(self, engine: Engine) -> str:
        tail = (await self.sup.tail(engine.name, LOG_TAIL_LINES)).strip() or "(the log is empty)"
        return tail[-LOG_TAIL_CHARS:]

    async def _fail(self, engine: Engine, message: str) -> None:
        log.error("engine %s failed: %s", engine.name, message)
        engine.failed, engine.phase, engine.message = True, Phase.FAILED, message
        if engine.published:
            await self.state.endpoints.withdraw(engine.placement.id, self.node_id)
            engine.published = False
        # Stopped, and left stopped: a failed engine needs an operator (unload, fix, load).
        with contextlib.suppress(Exception):
            await self.sup.stop(engine.name)

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
                url = self._url(engine.placement)
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

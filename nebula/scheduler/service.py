"""The scheduler daemon: hold the leader lease, reconcile, sleep until woken or polled.

Several schedulers may run; the one holding `nebula:scheduler:leader` works,
the others wait to take over. A pass wakes on a pub/sub event or every
`scheduler_interval_s`, whichever comes first, and is correct either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
import uuid

from nebula import redis_health, redis_keys
from nebula.errors import NebulaError, StateUnavailable
from nebula.exporter import advertise, serve_metrics
from nebula.loops import jittered, reconcile_forever, run_loops
from nebula.models import Desired, Phase
from nebula.scheduler import scheduler_metrics
from nebula.scheduler.autoscale import Autoscaler, Scaling
from nebula.scheduler.reconcile import needs_placement, reconcile, usage_of
from nebula.scheduler.snapshot import Changes, Snapshot
from nebula.scheduler.store import ClusterStore
from nebula.scheduler.usage import Usage
from nebula.settings import Settings
from nebula.store import State
from nebula.store.demand import totals

log = logging.getLogger(__name__)

# A full re-read of every request and placement this often, as a guard against
# anything the incremental reads could miss.
FULL_RESYNC_S = 30.0


def refreeze() -> None:
    """Tens of thousands of long-lived objects (requests, placements) were just read:
    keep the collector from walking them on every later pass (`gc.freeze`). The
    previous full pass's objects, frozen then, are garbage now: unfreeze and collect
    them first, or each full pass would leak the one before it."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Scheduler:
    def __init__(self, state: State, settings: Settings, *, identity: str | None = None) -> None:
        self.state = state
        self.cluster = ClusterStore(state)
        self.settings = settings
        self.me = identity or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.is_leader = False
        self.snapshot = Snapshot()
        self.usage = Usage()  # the placements as running sums; rebuilt on full passes
        self._last_full = 0.0
        self._telemetry_at = 0.0
        self._used_at = 0.0
        self._wake = asyncio.Event()
        # Grace, not panic: right after taking the lease or after Redis comes back,
        # a missing heartbeat may be one that has not been written again yet (a key
        # that lapsed during the outage, or one lost with a Redis that restarted).
        # Until this time no node is declared dead.
        self._grace_until = 0.0
        self._outage = False
        self._was_exporting = False
        self._epoch = 0  # the state store's master epoch this scheduler has seen
        self.autoscaler = Autoscaler(
            settings.scale_up_window_s,
            settings.scale_down_window_s,
            settings.scale_tolerance,
            settings.max_concurrency,
        )

    async def run(self) -> None:
        log.info("scheduler %s starting", self.me)
        address = serve_metrics(
            self.settings.metrics_address,
            self.settings.scheduler_metrics_port,
            "NEBULA_SCHEDULER_METRICS_PORT",
            "scheduler",
        )
        try:
            await run_loops(
                {
                    "reconcile": lambda: reconcile_forever(
                        "reconcile pass",
                        self.step,
                        wake=self._wake,
                        interval=lambda: jittered(self.interval),
                        on_error=self._unavailable,
                        listen=(self.state, redis_keys.EVENTS_CHANNEL),
                        on_bug=self._start_over,
                    ),
                    "advertise": lambda: advertise(
                        self.state, "scheduler", self.me, address, self.interval
                    ),
                    "redis-health": lambda: redis_health.watch(self.state, self.interval),
                }
            )
        finally:
            if self.is_leader:
                with contextlib.suppress(StateUnavailable):
                    await self.state.lease.release(self.me)
                log.info("scheduler %s released the leader lease", self.me)

    @property
    def interval(self) -> float:
        # Wake often enough to renew the lease well before it lapses.
        return min(self.settings.scheduler_interval_s, self.settings.leader_ttl_s / 3)

    def _unavailable(self, exc: NebulaError) -> None:
        if not self._outage:
            log.warning("%s; retrying", exc.message)
        self._outage = True

    def _start_over(self) -> None:
        """After a bug in a pass: the next pass starts from a full read."""
        self.snapshot, self.usage, self._last_full = Snapshot(), Usage(), 0.0

    async def step(self) -> Changes | None:
        """One pass: renew or take the lease, then, as leader, read, reconcile and write."""
        now = time.time()
        became_leader = await self._lease(now)
        if not self.is_leader:
            if self._was_exporting:
                scheduler_metrics.clear()  # a standby exports no stale picture of the cluster
                self._was_exporting = False
            return None
        started = time.perf_counter()
        full = became_leader or now - self._last_full > FULL_RESYNC_S
        # Models' last use: about once per router flush (idle unloads, evictions).
        used = full or now - self._used_at >= self.settings.usage_flush_s
        snap = await self._read(now, full=full, used=used)
        spared = self._spared(snap, now)
        scalings = await self._autoscale(snap, now, record=used)
        changes = reconcile(
            snap,
            ceiling=self.settings.memory_ceiling,
            now=now,
            full=full,
            usage=self.usage,
            spared=spared,
            max_replacements=self.settings.max_replacements,
            backoff_s=self.settings.replacement_backoff_s,
            idle_grace_s=3 * self.settings.usage_flush_s,
        )
        scheduler_metrics.record(snap, changes.pending)
        if scalings:
            changes.scaled = [x.request for x in scalings]
            changes.events[:0] = [(x.request.id, x.reason, x.request.status) for x in scalings]
        self._was_exporting = True
        if full:
            refreeze()
        written = await self._write(changes, scalings) if changes else True
        scheduler_metrics.PASS_SECONDS.observe(time.perf_counter() - started)
        return changes if written else None

    async def _lease(self, now: float) -> bool:
        """Renew or take the leader lease; True when this pass took it."""
        held = await self.state.lease.acquire_or_renew(
            self.me, self.settings.leader_ttl_s, held=self.is_leader
        )
        if held != self.is_leader:
            log.info("scheduler %s %s leader", self.me, "became" if held else "is no longer")
        became_leader = held and not self.is_leader
        self.is_leader = held
        scheduler_metrics.LEADER.set(1 if held else 0)
        if self._outage or self._epoch != self.state.master_epoch:
            # Back from an outage, or on a new master (a failover may lose the last
            # heartbeats written to the old one): grace before any node is dead.
            log.info("state store reachable again" if self._outage else "new Redis master")
            self._outage = False
            self._epoch = self.state.master_epoch
            self._grace_until = now + self.settings.node_ttl_s
            # Our own last writes may be gone with the old master (AOF everysec,
            # asynchronous replicas): re-read everything rather than trust the cache.
            self._last_full = 0.0
        if became_leader:
            self._grace_until = max(self._grace_until, now + self.settings.node_ttl_s)
        return became_leader

    async def _read(self, now: float, *, full: bool, used: bool) -> Snapshot:
        """What changed since the last pass (everything on a full one), and telemetry
        where placement may need it."""
        snap = await self.cluster.read(self.snapshot, full=full, last_used=used)
        if used:
            self._used_at = now
        if full:
            self._last_full = now
            self.usage = usage_of(snap)
            snap.placements = {}  # from here on the usage holds them, kept current
        # Telemetry matters only to placement, and is at most one heartbeat fresh:
        # read it all when something may be placed and the copy is a heartbeat
        # old, else only for nodes not seen before.
        stale = now - self._telemetry_at >= self.settings.heartbeat_interval_s
        if full or (stale and needs_placement(snap, self.usage)):
            await self.cluster.read_telemetry(snap, snap.alive)
            self._telemetry_at = now
        else:
            await self.cluster.read_telemetry(snap, snap.alive - snap.nodes.keys())
        return snap

    def _spared(self, snap: Snapshot, now: float) -> frozenset[str]:
        """Silent nodes not declared dead yet: the grace after an outage or a new leader."""
        spared = frozenset(snap.node_ids - snap.alive) if now < self._grace_until else frozenset()
        if spared:
            log.info(
                "not declaring %s dead yet: %.1fs of grace left after an outage or a new leader",
                ", ".join(sorted(spared)),
                self._grace_until - now,
            )
        return spared

    async def _write(self, changes: Changes, scalings: list[Scaling]) -> bool:
        """Write the pass's changes under the lease; False when the lease was lost."""
        if not await self.cluster.apply(changes, leader=self.me):
            log.warning("scheduler %s lost the leader lease before writing", self.me)
            self.is_leader = False
            # `usage` already holds the unwritten changes: start over from Redis.
            self.snapshot, self.usage = Snapshot(), Usage()
            return False
        self._remember(changes)
        for model in changes.idle_unloaded:
            scheduler_metrics.IDLE_UNLOADS.labels(model).inc()
            log.info("model %s idle past its keep-alive: unloading", model)
        for x in scalings:
            scheduler_metrics.SCALE_EVENTS.labels(x.request.model, x.direction).inc()
        for victim, model in changes.evicted:
            scheduler_metrics.EVICTIONS.labels(victim).inc()
            log.info("model %s evicted to make room for %s", victim, model)
        if changes.dead_nodes:
            scheduler_metrics.NODES_LOST.inc(len(changes.dead_nodes))
            log.warning("node(s) %s declared dead", ", ".join(changes.dead_nodes))
        return True

    async def _autoscale(self, snap: Snapshot, now: float, *, record: bool) -> list[Scaling]:
        """Move autoscaled requests' replicas with the routers' demand, before the pass
        (which then places the new replicas or drains the extra ones at once)."""
        demand: dict[str, int] = {}
        if any(r.autoscaled for r in snap.requests.values()):
            read = totals(await self.state.demand.all())
            demand = {model: total for model, (total, _) in read.items()}
        scalings = self.autoscaler.decide(snap.requests.values(), demand, now)
        for x in scalings:
            snap.requests[x.request.id] = x.request
            snap.dirty_requests.add(x.request.id)
        if record:  # about once a second: O(placements)
            self._record_replicas(snap, demand)
        return scalings

    def _record_replicas(self, snap: Snapshot, demand: dict[str, int]) -> None:
        desired, ready = {}, {}
        for r in snap.requests.values():
            desired[r.model] = r.replicas
            ready[r.model] = sum(
                1
                for pid in self.usage.by_request.get(r.id, ())
                if self.usage.placements[pid].desired is Desired.RUN
                and (state := snap.states.get(pid)) is not None
                and state.phase is Phase.HEALTHY
            )
        autoscaled = {r.model for r in snap.requests.values() if r.autoscaled}
        shown = {m: n for m, n in demand.items() if m in autoscaled}
        shown.update((m, demand.get(m, 0)) for m in autoscaled)
        scheduler_metrics.record_replicas(desired, ready, shown)

    def _remember(self, changes: Changes) -> None:
        """Apply our own writes to the cached snapshot (we are their only writer)."""
        snap = self.snapshot  # placements live in self.usage, which reconcile updated
        for p in changes.drop_placements:
            snap.states.pop(p.id, None)
        for node_id in changes.dead_nodes:
            snap.node_ids.discard(node_id)
            snap.nodes.pop(node_id, None)
        for request in changes.put_requests:
            if request.id in snap.requests:
                snap.requests[request.id] = request
        for request in changes.gone_requests:
            snap.requests.pop(request.id, None)


async def serve(settings: Settings) -> None:
    state = State.of(settings)
    try:
        await state.ping()
        await Scheduler(state, settings).run()
    finally:
        await state.close()

"""One reconcile pass, pure: a snapshot of the cluster in, the writes to make out.

Level-triggered: the pass derives everything from the snapshot, never from
what woke it, so running it twice on the same state changes nothing the
second time.

`usage` holds the current placements (built from the snapshot when not
given); the pass updates it to match the changes it returns, so a caller
that keeps one must drop it if those changes are not written.

A replica whose engine failed is stopped and replaced (elsewhere if there is
room), after a back-off that doubles from `backoff_s`; after
`max_replacements` failures no more are tried, and the request is `Failed`
only when no replica of it runs.

A pass that read the models' last use (`snap.last_used_fresh`) unloads the
unpinned ones idle past their keep-alive, and, when a request fits nowhere,
evicts the least recently used idle ones that make room for it (see
`elasticity`); both go through the graceful `Unloading` path.

Nodes in `spared` have no heartbeat but are not declared dead (the scheduler's
grace after an outage or a change of leader): their placements stay.

With `full` false, only requests that something touched since the last pass
(their hash, their placements' states, their nodes' death or drain) are
re-examined, plus every request the placement function could serve: the
rest cannot have changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from nebula.durations import show_duration
from nebula.models import (
    Desired,
    ModelRequest,
    Node,
    Phase,
    Placement,
    Status,
)
from nebula.scheduler.autoscale import extra_replicas
from nebula.scheduler.elasticity import idle_since, idle_unloads, victims_for
from nebula.scheduler.placement import default_id, plan, wanting
from nebula.scheduler.snapshot import Changes, Snapshot
from nebula.scheduler.statuses import failed_once, status_changes
from nebula.scheduler.usage import Usage

# Engines in these phases hold their memory, so the node's telemetry shows it.
CONFIRMED_PHASES = frozenset({Phase.HEALTHY, Phase.STOPPING})


def where(p: Placement) -> str:
    if p.devices:
        gpus = ", ".join(str(d) for d in p.devices)
        return f"{p.node} GPU{'s' if len(p.devices) > 1 else ''} {gpus}"
    return f"{p.node} (CPU)"


def usage_of(snap: Snapshot) -> Usage:
    """The snapshot's placements as running sums (what a full pass starts from)."""
    confirmed = (pid for pid, s in snap.states.items() if s.phase in CONFIRMED_PHASES)
    return Usage.of(snap.placements.values(), confirmed)


def needs_placement(snap: Snapshot, usage: Usage) -> bool:
    """Whether some request lacks replicas (and so node telemetry is worth reading)."""
    draining = {n: n in snap.marks[1] for n in snap.alive}
    return bool(wanting(snap.requests.values(), usage, draining))


def reconcile(
    snap: Snapshot,
    *,
    ceiling: float,
    now: float,
    full: bool = True,
    usage: Usage | None = None,
    new_id: Callable[[], str] = default_id,
    spared: frozenset[str] = frozenset(),
    max_replacements: int = 3,
    backoff_s: float = 1.0,
    idle_grace_s: float = 3.0,
) -> Changes:
    """The writes that bring the cluster closer to what its requests ask for (the
    phases below, in order; the module's doc says what each decides)."""
    ps = Pass(
        snap,
        usage_of(snap) if usage is None else usage,
        now=now,
        ceiling=ceiling,
        spared=spared,
        max_replacements=max_replacements,
        backoff_s=backoff_s,
        idle_grace_s=idle_grace_s,
        new_id=new_id,
    )
    _unload_idle(ps)
    _confirm_memory(ps, full)
    _drop_dead_nodes(ps, full)
    for request_id in sorted(ps.focus):
        _retire(ps, request_id)
    pending = _place(ps)
    status_changes(
        ps.focus,
        snap.requests,
        {**ps.unloads, **ps.bumped},
        ps.usage,
        snap.states,
        pending,
        ps.ch,
        now=now,
        max_replacements=max_replacements,
    )
    return ps.ch


@dataclass
class Pass:
    """One pass's inputs, what it has decided so far, and its writes."""

    snap: Snapshot
    usage: Usage
    now: float
    ceiling: float
    spared: frozenset[str]
    max_replacements: int
    backoff_s: float
    idle_grace_s: float
    new_id: Callable[[], str]
    ch: Changes = field(default_factory=Changes)
    live: dict[str, Node] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    requests: dict[str, ModelRequest] = field(default_factory=dict)  # as this pass changes them
    unloads: dict[str, ModelRequest] = field(default_factory=dict)  # moved to Unloading here
    bumped: dict[str, ModelRequest] = field(default_factory=dict)  # a replica failed this pass
    focus: set[str] = field(default_factory=set)  # the requests re-examined

    def __post_init__(self) -> None:
        snap = self.snap
        self.live = {n: node for n, node in snap.nodes.items() if n in snap.alive}
        self.draining = {n for n, node in self.live.items() if node.draining}
        self.requests = snap.requests


def _unload_idle(ps: Pass) -> None:
    """Unpinned models idle past their keep-alive go to Unloading (a pass that read
    the models' last use only)."""
    if not ps.snap.last_used_fresh:
        return
    found = idle_unloads(ps.requests.values(), ps.snap.last_used, ps.now, ps.idle_grace_s)
    for r, text in found:
        ps.unloads[r.id] = replace(r, status=Status.UNLOADING)
        ps.ch.events.append((r.id, text, Status.UNLOADING))
        ps.ch.idle_unloaded.append(r.model)
    if ps.unloads:
        ps.requests = {**ps.requests, **ps.unloads}


def _confirm_memory(ps: Pass, full: bool) -> None:
    """Engines whose memory now shows in telemetry (or no longer does)."""
    usage, states = ps.usage, ps.snap.states
    for node_id in usage.by_node.keys() if full else ps.snap.dirty_nodes & usage.by_node.keys():
        for pid in list(usage.by_node[node_id]):
            state = states.get(pid)
            usage.confirm(pid, state is not None and state.phase in CONFIRMED_PHASES)


def _drop_dead_nodes(ps: Pass, full: bool) -> None:
    """Dead nodes: their placements are gone with them, and get rescheduled below.
    `spared` nodes are silent but in their grace: neither dead nor used for new work.
    Also: which requests this pass looks at."""
    snap, usage, ch = ps.snap, ps.usage, ps.ch
    ch.dead_nodes = sorted(snap.node_ids - snap.alive - ps.spared)
    ps.focus = set(ps.requests) | set(usage.by_request) if full else set(snap.dirty_requests)
    ps.focus.update(ps.unloads)
    for node_id in usage.by_node.keys() - ps.live.keys() - ps.spared:
        for pid in sorted(usage.by_node[node_id]):
            p = usage.placements[pid]
            ps.focus.add(p.request_id)
            ch.drop_placements.append(p)
            usage.drop(pid)
            if p.request_id in ps.requests and p.desired is Desired.RUN:
                lost = f"node {p.node} lost: replica on it is gone"
                ch.events.append((p.request_id, lost, ps.requests[p.request_id].status))
    for node_id in (snap.dirty_nodes | ps.draining) & usage.by_node.keys():
        ps.focus.update(usage.placements[pid].request_id for pid in usage.by_node[node_id])
    ps.focus -= snap.unreadable_requests  # left as they are until they can be read


def _retire(ps: Pass, request_id: str) -> None:
    """A request's placements: stopped ones deleted; unwanted, failed, moved off a
    draining node or beyond a lowered count asked to stop."""
    request = ps.requests.get(request_id)
    usage, states = ps.usage, ps.snap.states
    placed = [usage.placements[pid] for pid in sorted(usage.by_request.get(request_id, ()))]
    healthy_off_drain = sum(
        1
        for p in placed
        if p.desired is Desired.RUN
        and p.node not in ps.draining
        and (state := states.get(p.id)) is not None
        and state.phase is Phase.HEALTHY
    )
    for p in placed:
        state = states.get(p.id)
        if p.desired is Desired.STOP:
            if state is not None and state.phase is Phase.STOPPED:
                ps.ch.drop_placements.append(p)
                usage.drop(p.id)
            continue
        reason = None
        if request is None:
            reason = "its model request is gone"
        elif request.status is Status.UNLOADING:
            reason = "unloading"
        elif (
            state is not None
            and state.phase is Phase.FAILED
            and request.status is not Status.FAILED
        ):
            why = state.message or "no reason given"
            reason = f"it failed: {why}"
            request = ps.bumped[request.id] = failed_once(
                ps.bumped.get(request.id, request), why, ps.now, ps.max_replacements, ps.backoff_s
            )
        elif p.node in ps.draining and healthy_off_drain >= request.replicas:
            reason = f"node {p.node} draining, replacement healthy"
        if reason is not None:
            _stop(p, request, reason, usage, ps.ch)
    if request is not None and request.status is not Status.UNLOADING:
        for p, reason in extra_replicas(request, placed, usage, states, ps.draining):
            _stop(p, request, reason, usage, ps.ch)


def _place(ps: Pass) -> dict[str, tuple[str, ...]]:
    """Place what is missing; evict idle models for what fits nowhere. What stays
    pending, with why."""
    usage, ch = ps.usage, ps.ch
    result = plan(
        list(ps.live.values()),
        [ps.bumped.get(r.id, r) for r in ps.requests.values()],
        usage=usage,
        ceiling=ps.ceiling,
        now=ps.now,
        new_id=ps.new_id,
        spared=ps.spared,
    )
    for p in result.new:
        usage.put(p, confirmed=False)
        ch.put_placements.append(p)
        text = f"Scheduled on {where(p)}, port {p.port}"
        ch.events.append((p.request_id, text, Status.SCHEDULED))
    ps.focus.update(p.request_id for p in result.new)
    ps.focus.update(result.pending)
    ch.pending = result.pending
    snap = ps.snap
    if result.pending and not snap.last_used_fresh:
        for request_id, note in snap.making_room.items():
            if request_id in result.pending:
                result.pending[request_id] = (note,)
    elif result.pending:
        evicted = _evict(
            snap,
            ps.requests,
            result.pending,
            ps.live,
            usage,
            ch,
            ps.now,
            ps.ceiling,
            ps.idle_grace_s,
            ps.spared,
        )
        ps.unloads.update(evicted)
        ps.requests = {**ps.requests, **evicted}
        ps.focus.update(evicted)
    return result.pending


def _evict(
    snap: Snapshot,
    requests: dict[str, ModelRequest],
    pending: dict[str, tuple[str, ...]],
    live: dict[str, Node],
    usage: Usage,
    ch: Changes,
    now: float,
    ceiling: float,
    grace_s: float,
    spared: frozenset[str],
) -> dict[str, ModelRequest]:
    """Make room for the oldest request that fits nowhere by unloading idle models;
    the ones moved to Unloading, by id. Their engines stop here; the request is
    placed on a later pass, once their memory is free."""
    first = min(
        (requests[rid] for rid in pending if rid in requests),
        key=lambda r: (r.created_at, r.id),
        default=None,
    )
    snap.making_room = {}
    if first is None:
        return {}
    victims = victims_for(
        first,
        requests.values(),
        list(live.values()),
        usage,
        snap.last_used,
        now=now,
        ceiling=ceiling,
        grace_s=grace_s,
        spared=spared,
    )
    if victims is None:
        return {}  # no eviction would do: Pending with the reasons, as always
    if not victims:
        freeing = sorted(r.model for r in requests.values() if r.status is Status.UNLOADING)
        note = f"waiting for {', '.join(freeing)} to unload and free memory"
        pending[first.id] = (note,)
        snap.making_room[first.id] = note
        return {}
    names = ", ".join(v.model for v in victims)
    note = f"evicting idle {names} to make room"
    pending[first.id] = (note,)
    snap.making_room[first.id] = f"waiting for {names} to unload and free memory"
    return {v.id: _evicted(v, first, snap.last_used, usage, ch, now) for v in victims}


def _evicted(
    victim: ModelRequest,
    first: ModelRequest,
    last_used: dict[str, float],
    usage: Usage,
    ch: Changes,
    now: float,
) -> ModelRequest:
    """`victim` moved to Unloading for `first`, its engines asked to stop."""
    idle = show_duration(now - idle_since(victim, last_used))
    text = f"evicted (idle {idle}) to make room for {first.model}"
    ch.events.append((victim.id, text, Status.UNLOADING))
    ch.evicted.append((victim.model, first.model))
    for pid in sorted(usage.by_request.get(victim.id, ())):
        p = usage.placements[pid]
        if p.desired is Desired.RUN:
            stopped = p.stopped()
            usage.put(stopped)
            ch.put_placements.append(stopped)
            ch.events.append((victim.id, f"stopping replica on {where(p)}: evicted", victim.status))
    return replace(victim, status=Status.UNLOADING)


def _stop(
    p: Placement, request: ModelRequest | None, reason: str, usage: Usage, ch: Changes
) -> None:
    """Ask `p`'s engine to stop: its node withdraws the endpoint, drains, then stops it."""
    unloading = request is not None and request.status is Status.UNLOADING
    stopped = p.stopped(request.drain_timeout_s if unloading and request else None)
    usage.put(stopped)
    ch.put_placements.append(stopped)
    if request is not None:
        ch.events.append((request.id, f"stopping replica on {where(p)}: {reason}", request.status))

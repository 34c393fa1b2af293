"""One reconcile pass, pure: a snapshot of the cluster in, the writes to make out.

Level-triggered: the pass derives everything from the snapshot, never from
what woke it, so running it twice on the same state changes nothing the
second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from nebula.durations import show_duration
from nebula.models import (
    Desired,
    ModelRequest,
    Node,
    Phase,
    Placement,
    PlacementState,
    Status,
    can_transition,
)
from nebula.scheduler.autoscale import extra_replicas
from nebula.scheduler.elasticity import idle_since, idle_unloads, victims_for
from nebula.scheduler.placement import default_id, plan, wanting
from nebula.scheduler.snapshot import Changes, Snapshot
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
    """The writes that bring the cluster closer to what its requests ask for.

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
    if usage is None:
        usage = usage_of(snap)
    ch = Changes()
    live = {n: node for n, node in snap.nodes.items() if n in snap.alive}
    requests = snap.requests
    states = snap.states
    # Requests this pass moves to Unloading itself (idle, evicted), by id.
    unloads: dict[str, ModelRequest] = {}
    if snap.last_used_fresh:
        for r, text in idle_unloads(requests.values(), snap.last_used, now, idle_grace_s):
            unloads[r.id] = replace(r, status=Status.UNLOADING)
            ch.events.append((r.id, text, Status.UNLOADING))
            ch.idle_unloaded.append(r.model)
        if unloads:
            requests = {**requests, **unloads}

    # Engines whose memory now shows in telemetry (or no longer does).
    for node_id in usage.by_node.keys() if full else snap.dirty_nodes & usage.by_node.keys():
        for pid in list(usage.by_node[node_id]):
            state = states.get(pid)
            usage.confirm(pid, state is not None and state.phase in CONFIRMED_PHASES)

    # Dead nodes: their placements are gone with them, and get rescheduled below.
    # `spared` nodes are silent but in their grace: neither dead nor used for new work.
    ch.dead_nodes = sorted(snap.node_ids - snap.alive - spared)
    focus: set[str] = set(requests) | set(usage.by_request) if full else set(snap.dirty_requests)
    focus.update(unloads)
    for node_id in usage.by_node.keys() - live.keys() - spared:
        for pid in sorted(usage.by_node[node_id]):
            p = usage.placements[pid]
            focus.add(p.request_id)
            ch.drop_placements.append(p)
            usage.drop(pid)
            if p.request_id in requests and p.desired is Desired.RUN:
                lost = f"node {p.node} lost: replica on it is gone"
                ch.events.append((p.request_id, lost, requests[p.request_id].status))
    draining = {n for n, node in live.items() if node.draining}
    for node_id in (snap.dirty_nodes | draining) & usage.by_node.keys():
        focus.update(usage.placements[pid].request_id for pid in usage.by_node[node_id])
    focus -= snap.unreadable_requests  # left as they are until they can be read

    # Retire placements: stopped ones are deleted, unwanted or failed ones asked to stop.
    bumped: dict[str, ModelRequest] = {}  # requests with a replica that failed this pass
    for request_id in sorted(focus):
        request = requests.get(request_id)
        placed = [usage.placements[pid] for pid in sorted(usage.by_request.get(request_id, ()))]
        healthy_off_drain = sum(
            1
            for p in placed
            if p.desired is Desired.RUN
            and p.node not in draining
            and (state := states.get(p.id)) is not None
            and state.phase is Phase.HEALTHY
        )
        for p in placed:
            if p.desired is Desired.STOP:
                state = states.get(p.id)
                if state is not None and state.phase is Phase.STOPPED:
                    ch.drop_placements.append(p)
                    usage.drop(p.id)
                continue
            reason = None
            state = states.get(p.id)
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
                request = bumped[request.id] = _failed_once(
                    bumped.get(request.id, request), why, now, max_replacements, backoff_s
                )
            elif p.node in draining and healthy_off_drain >= request.replicas:
                reason = f"node {p.node} draining, replacement healthy"
            if reason is not None:
                _stop(p, request, reason, usage, ch)
        if request is not None and request.status is not Status.UNLOADING:
            for p, reason in extra_replicas(request, placed, usage, states, draining):
                _stop(p, request, reason, usage, ch)

    # Place what is missing.
    result = plan(
        list(live.values()),
        [bumped.get(r.id, r) for r in requests.values()],
        usage=usage,
        ceiling=ceiling,
        now=now,
        new_id=new_id,
        spared=spared,
    )
    for p in result.new:
        usage.put(p, confirmed=False)
        ch.put_placements.append(p)
        text = f"Scheduled on {where(p)}, port {p.port}"
        ch.events.append((p.request_id, text, Status.SCHEDULED))
    focus.update(p.request_id for p in result.new)
    focus.update(result.pending)
    ch.pending = result.pending
    if result.pending and not snap.last_used_fresh:
        for request_id, note in snap.making_room.items():
            if request_id in result.pending:
                result.pending[request_id] = (note,)
    elif result.pending:
        evicted = _evict(
            snap, requests, result.pending, live, usage, ch, now, ceiling, idle_grace_s, spared
        )
        unloads.update(evicted)
        requests = {**requests, **evicted}
        focus.update(evicted)

    # Statuses.
    for request_id in sorted(focus):
        read = snap.requests.get(request_id)
        if read is None:
            continue
        request = bumped.get(request_id, unloads.get(request_id, read))
        placed = [usage.placements[pid] for pid in usage.by_request.get(request_id, ())]
        if request.status is Status.UNLOADING and not placed:
            ch.gone_requests.append(request)
            continue
        status, message = _status(
            request, placed, states, result.pending.get(request.id, ()), now, max_replacements
        )
        if status is read.status and message == read.message and request is read:
            continue
        ready_at = request.ready_at
        if status is Status.READY and read.status is not Status.READY:
            ready_at = now  # the idle clock starts here
        if not can_transition(read.status, status):
            continue
        recovered = status is Status.READY
        updated = replace(
            request,
            status=status,
            message=message,
            updated_at=now,
            ever_ready=request.ever_ready or status is Status.READY,
            # Every replica healthy again: earlier failures no longer count.
            failures=0 if recovered else request.failures,
            retry_at=0.0 if recovered else request.retry_at,
            ready_at=ready_at,
        )
        request = read
        ch.put_requests.append(updated)
        pending_changed = status is Status.PENDING and message != request.message
        if status is not request.status or pending_changed:
            ch.events.append((request.id, f"{status.value}: {message}", status))
    return ch


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
    out = {}
    names = ", ".join(v.model for v in victims)
    for v in victims:
        out[v.id] = replace(v, status=Status.UNLOADING)
        idle = show_duration(now - idle_since(v, snap.last_used))
        text = f"evicted (idle {idle}) to make room for {first.model}"
        ch.events.append((v.id, text, Status.UNLOADING))
        ch.evicted.append((v.model, first.model))
        for pid in sorted(usage.by_request.get(v.id, ())):
            p = usage.placements[pid]
            if p.desired is Desired.RUN:
                stopped = p.stopped()
                usage.put(stopped)
                ch.put_placements.append(stopped)
                ch.events.append((v.id, f"stopping replica on {where(p)}: evicted", v.status))
    note = f"evicting idle {names} to make room"
    pending[first.id] = (note,)
    snap.making_room[first.id] = f"waiting for {names} to unload and free memory"
    return out


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


def _failed_once(
    request: ModelRequest, why: str, now: float, max_replacements: int, backoff_s: float
) -> ModelRequest:
    """`request` after one more of its replicas failed: counted, with the next back-off."""
    failures = request.failures + 1
    if failures > max_replacements:
        retry_at = float("inf")  # given up: no more replacements
    else:
        retry_at = now + min(300.0, backoff_s * 2 ** (failures - 1))
    return replace(request, failures=failures, retry_at=retry_at, last_failure=why[-1500:])


def _status(
    request: ModelRequest,
    placed: list[Placement],
    states: dict[str, PlacementState],
    pending: tuple[str, ...],
    now: float = 0.0,
    max_replacements: int = 3,
) -> tuple[Status, str]:
    if request.status is Status.UNLOADING:
        return Status.UNLOADING, f"unloading: {len(placed)} replica(s) stopping"
    if request.status is Status.FAILED:
        return request.status, request.message
    running = [p for p in placed if p.desired is Desired.RUN]
    phases = [(p, states.get(p.id)) for p in running]
    healthy = sum(1 for _, s in phases if s is not None and s.phase is Phase.HEALTHY)
    alive = [p for p, s in phases if s is None or s.phase is not Phase.FAILED]
    given_up = request.failures > max_replacements
    if given_up and not alive:
        return (
            Status.FAILED,
            f"no replica can run: {request.failures} failed; last: {request.last_failure}",
        )
    waiting = "; ".join(pending)
    if healthy >= request.replicas:
        return Status.READY, f"{request.replicas}/{request.replicas} replicas healthy"
    if request.autoscaled and healthy >= request.min_replicas and request.ever_ready:
        # Autoscaling asked for more than run: serving as asked, growing.
        suffix = f"; {waiting}" if waiting else ""
        return Status.READY, (
            f"{healthy}/{request.replicas} replicas healthy, scaling out to "
            f"{request.replicas}{suffix}"
        )
    note = ""
    if request.failures and given_up:
        note = f"; {request.failures} replicas failed, no more replacements: {request.last_failure}"
    elif request.failures:
        note = (
            f"; a replica failed, replacing it after a back-off (attempt "
            f"{request.failures} of {max_replacements}): {request.last_failure}"
        )
    counts = f"{healthy}/{request.replicas} replicas healthy{note}"
    suffix = f"; {waiting}" if waiting else ""
    if request.ever_ready:
        # Served before: whatever is missing now (lost, failed, not yet replaced) is
        # a degradation, not a first load.
        return Status.DEGRADED, counts + suffix
    if healthy or any(s is not None for _, s in phases):
        return Status.LOADING, counts + suffix
    if running:
        return (
            Status.SCHEDULED,
            f"{len(running)}/{request.replicas} replicas placed{note}{suffix}",
        )
    if request.failures:
        return Status.LOADING, counts + suffix
    return Status.PENDING, waiting or "waiting for the scheduler"

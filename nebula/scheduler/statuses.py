"""A model request's status from its replicas, and the status writes of a pass: pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from nebula.models import (
    Desired,
    ModelRequest,
    Phase,
    Placement,
    PlacementState,
    Status,
    can_transition,
)
from nebula.scheduler.snapshot import Changes
from nebula.scheduler.usage import Usage


def status_changes(
    focus: set[str],
    read: Mapping[str, ModelRequest],
    current: Mapping[str, ModelRequest],
    usage: Usage,
    states: dict[str, PlacementState],
    pending: dict[str, tuple[str, ...]],
    ch: Changes,
    *,
    now: float,
    max_replacements: int,
) -> None:
    """The new status of each request in `focus` (`read`: as the pass read it;
    `current`: as the pass changed it), written to `ch`; requests unloaded and
    without replicas are gone."""
    for request_id in sorted(focus):
        before = read.get(request_id)
        if before is None:
            continue
        request = current.get(request_id, before)
        placed = [usage.placements[pid] for pid in usage.by_request.get(request_id, ())]
        if request.status is Status.UNLOADING and not placed:
            ch.gone_requests.append(request)
            continue
        status, message = status_of(
            request, placed, states, pending.get(request.id, ()), now, max_replacements
        )
        if status is before.status and message == before.message and request is before:
            continue
        if not can_transition(before.status, status):
            continue
        ch.put_requests.append(_updated(request, before, status, message, now))
        pending_changed = status is Status.PENDING and message != before.message
        if status is not before.status or pending_changed:
            ch.events.append((before.id, f"{status.value}: {message}", status))


def _updated(
    request: ModelRequest, before: ModelRequest, status: Status, message: str, now: float
) -> ModelRequest:
    ready_at = request.ready_at
    if status is Status.READY and before.status is not Status.READY:
        ready_at = now  # the idle clock starts here
    recovered = status is Status.READY
    return replace(
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


def failed_once(
    request: ModelRequest, why: str, now: float, max_replacements: int, backoff_s: float
) -> ModelRequest:
    """`request` after one more of its replicas failed: counted, with the next back-off."""
    failures = request.failures + 1
    if failures > max_replacements:
        retry_at = float("inf")  # given up: no more replacements
    else:
        retry_at = now + min(300.0, backoff_s * 2 ** (failures - 1))
    return replace(request, failures=failures, retry_at=retry_at, last_failure=why[-1500:])


def status_of(
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

"""Replicas that follow the load: pure, no I/O.

A model loaded with a range (`--replicas 1..4`) has its `replicas` moved within it
by the demand the routers report (`store/demand.py`: requests in flight plus
waiting in their queues, summed over every router process). Each pass:

1. **Recommend**: `ceil(demand / target)` replicas, where the target is what one
   replica should work on at once (`ModelSpec.concurrency_target`), kept in the
   range; demand within `tolerance` of what the current replicas take
   recommends no change, so a steady load at the target never flaps.
2. **Stabilize**, as Kubernetes' HPA does: scale out to the *lowest*
   recommendation of the last `up_window_s` (the load called for at least that
   much all along), scale in to the *highest* of the last `down_window_s` (a
   cooldown: never below what the load needed lately). A window must be fully
   observed first, and a change starts the windows again, so no two changes
   come within one window.

A scale-out goes through placement and eviction like any load; a scale-in stops
the extra replicas through the drain (`extra_replicas`). The history lives
in the leader's memory: a new leader observes a full window before it changes
anything, which errs towards keeping what runs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from nebula.durations import show_duration
from nebula.models import Desired, ModelRequest, Phase, Placement, PlacementState, Status
from nebula.scheduler.usage import Usage

SERVING = frozenset({Status.READY, Status.DEGRADED})


@dataclass(frozen=True, slots=True)
class Scaling:
    """One change of a request's replicas, and why."""

    request: ModelRequest  # with its new `replicas`
    before: int
    reason: str

    @property
    def direction(self) -> str:
        return "out" if self.request.replicas > self.before else "in"


def recommend(request: ModelRequest, demand: int, target: int, tolerance: float) -> int:
    """The replicas `demand` calls for, in the request's range."""
    current = request.replicas
    if abs(demand / (current * target) - 1) <= tolerance:
        return current
    wanted = math.ceil(demand / target)
    return max(request.min_replicas, min(request.max_replicas, wanted))


class Autoscaler:
    def __init__(
        self, up_window_s: float, down_window_s: float, tolerance: float, default_target: int
    ) -> None:
        self.up_window_s = up_window_s
        self.down_window_s = down_window_s
        self.tolerance = tolerance
        self.default_target = default_target
        # request id -> (time, recommendation), oldest first; and when its window began
        self.history: dict[str, deque[tuple[float, int]]] = {}
        self.since: dict[str, float] = {}

    def decide(
        self, requests: Iterable[ModelRequest], demand: Mapping[str, int], now: float
    ) -> list[Scaling]:
        """The changes to make now, given each model's demand (requests in flight plus
        waiting, every router together)."""
        out = []
        seen = set()
        for request in requests:
            if not request.autoscaled or request.status not in SERVING:
                continue
            seen.add(request.id)
            change = self._observe(request, demand.get(request.model, 0), now)
            if change is not None:
                out.append(change)
        for gone in self.history.keys() - seen:
            del self.history[gone]
            self.since.pop(gone, None)
        return out

    def _observe(self, request: ModelRequest, demand: int, now: float) -> Scaling | None:
        target = request.spec.concurrency_target(self.default_target)
        history = self.history.setdefault(request.id, deque())
        since = self.since.setdefault(request.id, now)
        history.append((now, recommend(request, demand, target, self.tolerance)))
        horizon = now - max(self.up_window_s, self.down_window_s)
        while history and history[0][0] < horizon:
            history.popleft()
        current = request.replicas
        if now - since >= self.up_window_s:
            up = min(r for t, r in history if t >= now - self.up_window_s)
            if up > current:
                why = (
                    f"the load called for at least {up} replicas for "
                    f"{show_duration(self.up_window_s)} ({demand} requests in flight or "
                    f"waiting now, {target} per replica): scaling out {current} -> {up}"
                )
                return self._changed(request, up, why, now)
        if now - since >= self.down_window_s:
            down = max(r for t, r in history if t >= now - self.down_window_s)
            if down < current:
                why = (
                    f"the load called for at most {down} replica(s) for "
                    f"{show_duration(self.down_window_s)} ({demand} requests in flight or "
                    f"waiting now, {target} per replica): scaling in {current} -> {down}"
                )
                return self._changed(request, down, why, now)
        return None

    def _changed(self, request: ModelRequest, replicas: int, why: str, now: float) -> Scaling:
        self.history[request.id].clear()
        self.since[request.id] = now
        return Scaling(replace(request, replicas=replicas), request.replicas, why)


def extra_replicas(
    request: ModelRequest,
    placed: list[Placement],
    usage: Usage,
    states: dict[str, PlacementState],
    draining: set[str],
) -> list[tuple[Placement, str]]:
    """Replicas beyond `request.replicas` (autoscaling lowered it): the ones not yet
    healthy first, then the newest. Replicas on draining nodes are left to the drain."""
    running = [
        q
        for p in placed
        if (q := usage.placements.get(p.id)) is not None
        and q.desired is Desired.RUN
        and q.node not in draining
    ]
    excess = len(running) - request.replicas
    if excess <= 0:
        return []

    def stop_first(p: Placement) -> tuple[bool, float, str]:
        state = states.get(p.id)
        return (state is not None and state.phase is Phase.HEALTHY, -p.created_at, p.id)

    running.sort(key=stop_first)
    reason = f"scaled in to {request.replicas} replica(s)"
    return [(p, reason) for p in running[:excess]]

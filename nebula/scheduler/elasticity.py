"""Which loaded models give their memory back: idle unloads and evictions. Pure.

A model's idle clock starts when it last became Ready, and restarts with every
use the routers record (`nebula:last-used`; a model with requests in flight or
held is "used now", refreshed every `usage_flush_s`). `grace_s`, a few flush
intervals, absorbs the routers' batching: nothing used within it is idle, so a
model serving a request is never unloaded or evicted.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace

from nebula.durations import show_duration
from nebula.models import ModelRequest, Node, Status
from nebula.scheduler.placement import plan
from nebula.scheduler.usage import Usage

IDLE_STATUSES = frozenset({Status.READY, Status.DEGRADED})
MAX_VICTIMS = 32  # per eviction: bounds the trial placements


def idle_since(request: ModelRequest, last_used: dict[str, float]) -> float:
    return max(last_used.get(request.model, 0.0), request.ready_at or request.created_at)


def idle_unloads(
    requests: Iterable[ModelRequest], last_used: dict[str, float], now: float, grace_s: float
) -> list[tuple[ModelRequest, str]]:
    """Unpinned models idle past their keep-alive, each with the reason.

    A load made on demand that failed is removed one keep-alive after it failed
    (however many requests it turned away meanwhile, each told why at once), so
    that a later request tries again: once per keep-alive, not once per request.
    """
    out = []
    for r in requests:
        removed_at = r.removed_after_failure_at
        if removed_at is not None:
            if now > removed_at:
                out.append(
                    (
                        r,
                        f"the load on demand failed {show_duration(now - r.updated_at)} "
                        f"ago (keep-alive {show_duration(r.keep_alive_s)}): removing it, "
                        "so that the next request tries again",
                    )
                )
            continue
        if r.keep_alive_s is None or r.status not in IDLE_STATUSES:
            continue
        idle = now - idle_since(r, last_used)
        if idle > r.keep_alive_s + grace_s:
            out.append(
                (
                    r,
                    f"idle for {show_duration(idle)} (keep-alive "
                    f"{show_duration(r.keep_alive_s)}): unloading",
                )
            )
    return out


def victims_for(
    pending: ModelRequest,
    requests: Iterable[ModelRequest],
    nodes: Sequence[Node],
    usage: Usage,
    last_used: dict[str, float],
    *,
    now: float,
    ceiling: float,
    grace_s: float,
    spared: frozenset[str] = frozenset(),
) -> list[ModelRequest] | None:
    """The fewest least-recently-used idle, unpinned models whose unloading makes room
    for `pending`: [] when the models already unloading will free enough, None when
    even evicting every candidate would not."""
    every = list(requests)
    freeing = {
        pid for r in every if r.status is Status.UNLOADING for pid in usage.by_request.get(r.id, ())
    }
    candidates = sorted(
        (
            r
            for r in every
            if r.id != pending.id
            and not r.pinned
            and r.status in IDLE_STATUSES
            and now - last_used.get(r.model, 0.0) > grace_s
        ),
        # Least recently used first: by last use (never used: first), then by idle time.
        key=lambda r: (last_used.get(r.model, 0.0), idle_since(r, last_used), r.id),
    )[:MAX_VICTIMS]
    for k in range(len(candidates) + 1):
        gone = set(freeing)
        for victim in candidates[:k]:
            gone.update(usage.by_request.get(victim.id, ()))
        if gone and _fits(pending, nodes, usage, gone, now=now, ceiling=ceiling, spared=spared):
            return candidates[:k]
    return None


def _fits(
    request: ModelRequest,
    nodes: Sequence[Node],
    usage: Usage,
    gone: set[str],
    *,
    now: float,
    ceiling: float,
    spared: frozenset[str],
) -> bool:
    """Would every replica of `request` be placed were the placements `gone` stopped?"""
    freed_gpu: dict[tuple[str, int], float] = defaultdict(float)
    freed_ram: dict[str, float] = defaultdict(float)
    for pid in gone:
        p = usage.placements[pid]
        if pid not in usage.confirmed:
            continue  # not running yet: its memory does not show in telemetry
        for index in p.devices:
            freed_gpu[p.node, index] += p.gpu_fraction
        if not p.devices:
            freed_ram[p.node] += p.ram_gib
    trial_nodes = []
    for node in nodes:
        devices = tuple(
            replace(d, memory_used_mib=_less(d.memory_used_mib, freed, d.memory_total_mib))
            if (freed := freed_gpu.get((node.id, d.index))) is not None
            else d
            for d in node.devices
        )
        extra = int(freed_ram.get(node.id, 0.0) * 1024)
        trial_nodes.append(
            replace(node, devices=devices, ram_available_mib=node.ram_available_mib + extra)
        )
    trial = Usage.of(
        (p for pid, p in usage.placements.items() if pid not in gone), usage.confirmed - gone
    )
    counter = itertools.count()

    def ids() -> str:
        return f"trial-{next(counter)}"

    result = plan(
        trial_nodes, [request], usage=trial, ceiling=ceiling, now=now, new_id=ids, spared=spared
    )
    return request.id not in result.pending and bool(result.new)


def _less(used_mib: int, fraction: float, total_mib: int) -> int:
    return max(0, int(used_mib - fraction * total_mib))

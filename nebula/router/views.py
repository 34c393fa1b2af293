"""How the admin API shows Nebula's objects: the JSON that nebula-cli and nebula-shell read."""

from __future__ import annotations

from typing import Any

from nebula.durations import show_duration
from nebula.models import ModelRequest, Node, Placement, PlacementState, Status


def request_view(
    r: ModelRequest, last_used: dict[str, float] | None = None, now: float | None = None
) -> dict[str, Any]:
    """A model request; with `last_used`, also when it was last used and for how long
    it has been idle (None while it is not Ready)."""
    used = (last_used or {}).get(r.model)
    idle = None
    if now is not None and r.status in (Status.READY, Status.DEGRADED):
        idle = round(max(0.0, now - max(used or 0.0, r.ready_at or r.created_at)), 1)
    return {
        "id": r.id,
        "model": r.model,
        "replicas": r.replicas,
        "min_replicas": r.min_replicas,
        "max_replicas": r.max_replicas,
        "autoscaled": r.autoscaled,
        "status": r.status.value,
        "message": r.message,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "spec": r.spec.to_dict(),
        "on_demand": r.on_demand,
        "pinned": r.pinned,
        "keep_alive": show_duration(r.keep_alive_s),
        "keep_alive_s": r.keep_alive_s,
        "last_used": used,
        "idle_s": idle,
    }


def node_view(n: Node, now: float) -> dict[str, Any]:
    return {
        "id": n.id,
        "address": n.address,
        "heartbeat_age_s": round(max(0.0, now - n.heartbeat_at), 3),
        "devices": [d.to_dict() for d in n.devices],
        "cpu_count": n.cpu_count,
        "ram_total_mib": n.ram_total_mib,
        "ram_available_mib": n.ram_available_mib,
        "version": n.version,
        "cordoned": n.cordoned,
        "draining": n.draining,
    }


def placement_view(p: Placement, state: PlacementState | None) -> dict[str, Any]:
    return {
        "id": p.id,
        "request_id": p.request_id,
        "model": p.model,
        "node": p.node,
        "devices": list(p.devices),
        "port": p.port,
        "desired": p.desired.value,
        "state": state.phase.value if state else None,
        "pid": state.pid if state else None,
        "restarts": state.restarts if state else 0,
        "message": state.message if state else "",
    }

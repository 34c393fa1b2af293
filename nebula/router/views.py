"""How the admin API shows Nebula's objects: the JSON that nebula-cli and nebula-shell read."""

from __future__ import annotations

from typing import Any

from nebula.models import ModelRequest, Node, Placement, PlacementState


def request_view(r: ModelRequest) -> dict[str, Any]:
    return {
        "id": r.id,
        "model": r.model,
        "replicas": r.replicas,
        "status": r.status.value,
        "message": r.message,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "spec": r.spec.to_dict(),
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

"""A model request's wire format: the `nebula:request:{id}` hash (store/wire.py has
the rules every stored value follows)."""

from __future__ import annotations

import json

from nebula.errors import NebulaError
from nebula.models import ModelRequest, Status
from nebula.store import wire


def encode(request: ModelRequest) -> dict[str, str]:
    return {
        wire.VERSION_FIELD: str(wire.VERSION),
        "id": request.id,
        "model": request.spec.name,
        "spec": json.dumps(request.spec.to_dict()),
        "replicas": str(request.replicas),
        "status": request.status.value,
        "message": request.message,
        "created_at": repr(request.created_at),
        "updated_at": repr(request.updated_at),
        "ever_ready": "1" if request.ever_ready else "0",
        "drain_timeout_s": "" if request.drain_timeout_s is None else repr(request.drain_timeout_s),
        "failures": str(request.failures),
        "retry_at": repr(request.retry_at),
        "last_failure": request.last_failure,
        "on_demand": "1" if request.on_demand else "0",
        "keep_alive_s": seconds(request.keep_alive_s),
        "ready_at": repr(request.ready_at),
        "min_replicas": str(request.min_replicas),
        "max_replicas": str(request.max_replicas),
    }


def seconds(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def decode(data: dict[str, str]) -> ModelRequest:
    return ModelRequest(
        id=data["id"],
        spec=wire.spec_from_dict(json.loads(data["spec"])),
        replicas=int(data["replicas"]),
        status=Status(data["status"]),
        message=data.get("message", ""),
        created_at=float(data.get("created_at") or 0.0),
        updated_at=float(data.get("updated_at") or 0.0),
        ever_ready=data.get("ever_ready") == "1",
        drain_timeout_s=float(data["drain_timeout_s"]) if data.get("drain_timeout_s") else None,
        failures=int(data.get("failures") or 0),
        retry_at=float(data.get("retry_at") or 0.0),
        last_failure=data.get("last_failure", ""),
        on_demand=data.get("on_demand") == "1",
        keep_alive_s=float(data["keep_alive_s"]) if data.get("keep_alive_s") else None,
        ready_at=float(data.get("ready_at") or 0.0),
        # Absent (written before autoscaling): a fixed count, min = max = replicas.
        min_replicas=int(data.get("min_replicas") or 0),
        max_replicas=int(data.get("max_replicas") or 0),
    )


def readable(raw: dict[str, str], ref: str) -> ModelRequest:
    """One request an operator named: decoded, or a clear error if this Nebula cannot
    read it (a newer version's status, or damage); never a crash in the admin API."""
    try:
        return decode(raw)
    except wire.UNREADABLE as exc:
        wire.skipped("model request", ref, exc)
        raise NebulaError(
            f"model request {ref!r} is stored in a form this Nebula cannot read "
            f"({type(exc).__name__}: {exc}); a newer version may have written it"
        ) from None

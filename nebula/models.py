"""Domain types shared by every component, and their round trip to Redis values.

Plain dataclasses rather than pydantic models: the scheduler builds tens of
thousands of them per pass, and validation happens once, at the edges
(the catalog, the request API), not on every read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """A model request's status; see docs/architecture.md for the state machine."""

    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    LOADING = "Loading"
    READY = "Ready"
    DEGRADED = "Degraded"
    UNLOADING = "Unloading"
    FAILED = "Failed"


_SERVING = {Status.PENDING, Status.SCHEDULED, Status.LOADING, Status.READY, Status.DEGRADED}

# Allowed transitions. Unloading leads only to gone (the request is deleted);
# Failed only to Unloading: a failed engine needs an operator's decision.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    **{s: frozenset(_SERVING | {Status.UNLOADING, Status.FAILED}) for s in _SERVING},
    Status.UNLOADING: frozenset({Status.UNLOADING}),
    Status.FAILED: frozenset({Status.FAILED, Status.UNLOADING}),
}


def can_transition(old: Status, new: Status) -> bool:
    return new in TRANSITIONS[old]


class Phase(StrEnum):
    """What a node's agent sees of one placement's engine."""

    STARTING = "Starting"
    HEALTHY = "Healthy"
    FAILED = "Failed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"


class Task(StrEnum):
    CHAT = "chat"
    EMBEDDING = "embedding"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model as the catalog describes it, after any per-request overrides."""

    name: str  # the served model name: what clients put in `model`
    model: str  # Hugging Face id, or a path on the node
    task: Task = Task.CHAT
    engine: str = "vllm"
    prepared: str | None = None  # folder that `nebula models prepare` makes on CPU nodes
    gpu_memory_utilization: float | None = None  # fraction of one GPU per tensor-parallel rank
    cpu_memory_gib: float | None = None  # RAM on a CPU node
    tensor_parallel_size: int = 1
    engine_args: tuple[str, ...] = ()
    drain_timeout_s: float | None = None  # on unload; the node's setting when None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["engine_args"] = list(self.engine_args)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        # Fields a newer writer added are ignored (rolling upgrades).
        known = {k: v for k, v in data.items() if k in _SPEC_FIELDS}
        args = tuple(data["engine_args"])
        return cls(**{**known, "task": Task(data["task"]), "engine_args": args})


_SPEC_FIELDS = frozenset(f.name for f in fields(ModelSpec))


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """Desired state: serve `spec` with `replicas` engines."""

    id: str
    spec: ModelSpec
    replicas: int
    status: Status = Status.PENDING
    message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    ever_ready: bool = False  # tells Degraded (lost replicas) from Loading (not there yet)
    drain_timeout_s: float | None = None  # asked with the unload; else the spec's or node's
    failures: int = 0  # replicas that failed and were replaced (or given up on)
    retry_at: float = 0.0  # no replacement is placed before this time (back-off)
    last_failure: str = ""  # why the last replica failed (its log's last lines)

    @property
    def model(self) -> str:
        return self.spec.name

    def to_hash(self) -> dict[str, str]:
        return {
            "id": self.id,
            "model": self.spec.name,
            "spec": json.dumps(self.spec.to_dict()),
            "replicas": str(self.replicas),
            "status": self.status.value,
            "message": self.message,
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
            "ever_ready": "1" if self.ever_ready else "0",
            "drain_timeout_s": "" if self.drain_timeout_s is None else repr(self.drain_timeout_s),
            "failures": str(self.failures),
            "retry_at": repr(self.retry_at),
            "last_failure": self.last_failure,
        }

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> ModelRequest:
        return cls(
            id=data["id"],
            spec=ModelSpec.from_dict(json.loads(data["spec"])),
            replicas=int(data["replicas"]),
            status=Status(data["status"]),
            message=data.get("message", ""),
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]),
            ever_ready=data.get("ever_ready") == "1",
            drain_timeout_s=float(data["drain_timeout_s"]) if data.get("drain_timeout_s") else None,
            failures=int(data.get("failures") or 0),
            retry_at=float(data.get("retry_at") or 0.0),
            last_failure=data.get("last_failure", ""),
        )

    def public(self) -> dict[str, Any]:
        """The shape the admin API and `--json` show."""
        return {
            "id": self.id,
            "model": self.model,
            "replicas": self.replicas,
            "status": self.status.value,
            "message": self.message,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "spec": self.spec.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class Device:
    """One GPU as the node's telemetry reports it."""

    index: int
    name: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_pct: float = 0.0
    temperature_c: float | None = None
    power_w: float | None = None
    # Computed once: the scheduler reads it for every GPU of the cluster on every pass.
    free_fraction: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        total, used = self.memory_total_mib, self.memory_used_mib
        free = max(0.0, (total - used) / total) if total > 0 else 0.0
        object.__setattr__(self, "free_fraction", free)

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        del data["free_fraction"]
        return data


@dataclass(frozen=True, slots=True)
class Node:
    """A node as its heartbeat describes it, plus the operator's marks."""

    id: str
    address: str
    devices: tuple[Device, ...] = ()
    cpu_count: int = 0
    ram_total_mib: int = 0
    ram_available_mib: int = 0
    port_min: int = 8100
    port_max: int = 8199
    version: str = ""
    heartbeat_at: float = 0.0
    cordoned: bool = False
    draining: bool = False

    @property
    def has_gpus(self) -> bool:
        return bool(self.devices)

    def to_hash(self) -> dict[str, str]:
        return {
            "id": self.id,
            "address": self.address,
            "devices": json.dumps([d.public() for d in self.devices]),
            "cpu_count": str(self.cpu_count),
            "ram_total_mib": str(self.ram_total_mib),
            "ram_available_mib": str(self.ram_available_mib),
            "port_min": str(self.port_min),
            "port_max": str(self.port_max),
            "version": self.version,
            "heartbeat_at": repr(self.heartbeat_at),
        }

    @classmethod
    def from_hash(
        cls,
        data: dict[str, str],
        *,
        cordoned: bool = False,
        draining: bool = False,
        devices: tuple[Device, ...] | None = None,  # already parsed from data["devices"]
    ) -> Node:
        if devices is None:
            devices = tuple(Device(**d) for d in json.loads(data.get("devices", "[]")))
        return cls(
            id=data["id"],
            address=data["address"],
            devices=devices,
            cpu_count=int(data.get("cpu_count", 0)),
            ram_total_mib=int(data.get("ram_total_mib", 0)),
            ram_available_mib=int(data.get("ram_available_mib", 0)),
            port_min=int(data.get("port_min", 8100)),
            port_max=int(data.get("port_max", 8199)),
            version=data.get("version", ""),
            heartbeat_at=float(data.get("heartbeat_at", 0.0)),
            cordoned=cordoned or draining,
            draining=draining,
        )

    def public(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": self.address,
            "heartbeat_age_s": round(max(0.0, now - self.heartbeat_at), 3),
            "devices": [d.public() for d in self.devices],
            "cpu_count": self.cpu_count,
            "ram_total_mib": self.ram_total_mib,
            "ram_available_mib": self.ram_available_mib,
            "version": self.version,
            "cordoned": self.cordoned,
            "draining": self.draining,
        }


class Desired(StrEnum):
    RUN = "run"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class Placement:
    """One replica of one request on one node: desired state, written by the scheduler.

    A placement marked `stop` still holds its memory until its node reports it
    `Stopped` (or the node dies): only then does the scheduler delete it, so a
    draining engine and its successor never share memory they cannot both have.
    """

    id: str
    request_id: str
    node: str
    port: int
    spec: ModelSpec
    devices: tuple[int, ...] = ()  # GPU indices; empty on a CPU node
    desired: Desired = Desired.RUN
    created_at: float = 0.0
    drain_timeout_s: float | None = None  # set with `stop` when an unload asked for one

    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def gpu_fraction(self) -> float:
        """Fraction of each of `devices` this placement holds."""
        return (self.spec.gpu_memory_utilization or 0.0) if self.devices else 0.0

    @property
    def ram_gib(self) -> float:
        return 0.0 if self.devices else (self.spec.cpu_memory_gib or 0.0)

    def stopped(self, drain_timeout_s: float | None = None) -> Placement:
        return replace(self, desired=Desired.STOP, drain_timeout_s=drain_timeout_s)

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "request_id": self.request_id,
                "node": self.node,
                "port": self.port,
                "spec": self.spec.to_dict(),
                "devices": list(self.devices),
                "desired": self.desired.value,
                "created_at": self.created_at,
                "drain_timeout_s": self.drain_timeout_s,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Placement:
        data = json.loads(raw)
        return cls(
            id=data["id"],
            request_id=data["request_id"],
            node=data["node"],
            port=int(data["port"]),
            spec=ModelSpec.from_dict(data["spec"]),
            devices=tuple(data["devices"]),
            desired=Desired(data["desired"]),
            created_at=float(data["created_at"]),
            drain_timeout_s=data.get("drain_timeout_s"),
        )


@dataclass(frozen=True, slots=True)
class PlacementState:
    """What a node's agent observed of one placement's engine."""

    phase: Phase
    pid: int | None = None
    restarts: int = 0
    message: str = ""
    updated_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "phase": self.phase.value,
                "pid": self.pid,
                "restarts": self.restarts,
                "message": self.message,
                "updated_at": self.updated_at,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> PlacementState:
        data = json.loads(raw)
        return cls(
            phase=Phase(data["phase"]),
            pid=data.get("pid"),
            restarts=int(data.get("restarts", 0)),
            message=data.get("message", ""),
            updated_at=float(data.get("updated_at", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A healthy engine the router may send requests to (the node's agent publishes it)."""

    placement_id: str
    request_id: str
    model: str
    node: str
    url: str  # base URL of the engine's OpenAI server, e.g. http://10.0.0.5:8100
    task: str = ""  # chat or embedding; "" from an agent older than this field

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Endpoint:
        # Fields a newer agent added are ignored, so a rolling upgrade never breaks routing.
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in _ENDPOINT_FIELDS})


_ENDPOINT_FIELDS = frozenset(f.name for f in fields(Endpoint))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A client key for /v1, as stored: only its hash, never the key itself."""

    name: str
    digest: str  # sha256 hex of the key
    rate_per_s: float | None = None  # requests per second; None for no limit
    created_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ApiKey:
        return cls(**json.loads(raw))

"""Domain types shared by every component (their Redis wire formats live in the stores).

Plain dataclasses rather than pydantic models: the scheduler builds tens of
thousands of them per pass, and validation happens once, at the edges
(the catalog, the request API), not on every read.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
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
    on_demand: bool = True  # may be loaded by its first request (where the cluster allows)
    keep_alive: str = ""  # idle time before an on-demand load unloads; "" = the default
    max_concurrency: int | None = None  # requests per replica at once (flow control's target)
    min_replicas: int | None = None  # the catalog's replica range, when a load names none
    max_replicas: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["engine_args"] = list(self.engine_args)
        return data

    def concurrency_target(self, default: int) -> int:
        """Requests one replica should work on at once: the catalog's max_concurrency,
        else the engine's own batch limit (--max-num-seqs), else `default`."""
        if self.max_concurrency:
            return self.max_concurrency
        args = self.engine_args
        for i, arg in enumerate(args):
            value = None
            if arg == "--max-num-seqs" and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith("--max-num-seqs="):
                value = arg.partition("=")[2]
            if value is not None and value.isdigit() and int(value) > 0:
                return int(value)
        return default


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
    on_demand: bool = False  # loaded by a client's request, not by an operator
    keep_alive_s: float | None = None  # unloaded after this long idle; None: pinned
    ready_at: float = 0.0  # when it was last Ready from not Ready (its idle clock's start)
    # The range autoscaling keeps `replicas` in; equal to it when not autoscaled.
    min_replicas: int = 0
    max_replicas: int = 0

    def __post_init__(self) -> None:
        if not self.min_replicas:
            object.__setattr__(self, "min_replicas", self.replicas)
        if not self.max_replicas:
            object.__setattr__(self, "max_replicas", max(self.replicas, self.min_replicas))

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas > self.min_replicas

    @property
    def pinned(self) -> bool:
        return self.keep_alive_s is None

    @property
    def removed_after_failure_at(self) -> float | None:
        """When the scheduler removes this load because it failed, so that a later
        request tries again: one keep-alive after it failed, for a load made on
        demand (an operator's stays Failed until unloaded). None: not removed."""
        if self.status is not Status.FAILED or not self.on_demand or self.keep_alive_s is None:
            return None
        return self.updated_at + self.keep_alive_s

    @property
    def model(self) -> str:
        """The served name: what clients send as `model`, as in `Endpoint.model`.
        (`spec.model` is where the weights come from, a hub id or a path: the
        catalog's own spelling, kept as it is so that catalogs read the same.)"""
        return self.spec.name


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

    def to_dict(self) -> dict[str, Any]:
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
        """The served name: what clients send as `model`, as in `Endpoint.model`.
        (`spec.model` is where the weights come from, a hub id or a path: the
        catalog's own spelling, kept as it is so that catalogs read the same.)"""
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


@dataclass(frozen=True, slots=True)
class PlacementState:
    """What a node's agent observed of one placement's engine."""

    phase: Phase
    pid: int | None = None
    restarts: int = 0
    message: str = ""
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A healthy engine the router may send requests to (the node's agent publishes it)."""

    placement_id: str
    request_id: str
    model: str
    node: str
    url: str  # base URL of the engine's OpenAI server, e.g. http://10.0.0.5:8100
    task: str = ""  # chat or embedding; "" from an agent older than this field
    # The engine publishes its KV-cache events to its agent: the router tags requests
    # with a session id so that its evictions name them (agent/kv_watch.py).
    kv_events: bool = False
    # Requests it should work on at once (flow control's target); 0: the router's
    # default (an agent older than this field).
    max_concurrency: int = 0


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A client key for /v1, as stored: only its hash, never the key itself."""

    name: str
    digest: str  # sha256 hex of the key
    rate_per_s: float | None = None  # requests per second; None for no limit
    created_at: float = 0.0
    # Its scope (nebula/tenancy.py). A key stored before scopes existed reads as
    # the keys were then: every model, on-demand loads allowed, no budget.
    models: tuple[str, ...] = ()  # names or globs it may use; empty: every model
    on_demand: bool = True  # may its requests load a model that is not loaded?
    priority: str = "normal"  # low, normal or high: its band when requests queue
    token_budget: int | None = None  # prompt + completion tokens per period; None: no limit
    budget_period: str = "day"  # day or month (UTC)


def digest(secret: str) -> str:
    """How API keys are stored and compared: never the key itself."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Demand:
    """One router process's demand for one model."""

    bands: tuple[int, int, int]  # high, normal, low: in flight + waiting
    queued: int  # of those, waiting in the router

    @property
    def total(self) -> int:
        return sum(self.bands)

"""The scheduler's Prometheus metrics (`nebula_scheduler_*`)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

from nebula.models import Status
from nebula.scheduler.snapshot import Snapshot

LEADER = Gauge("nebula_scheduler_leader", "1 while this scheduler holds the leader lease.")
PASS_SECONDS = Histogram(
    "nebula_scheduler_pass_seconds",
    "Time of one reconcile pass (read, plan, write), as leader.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
REQUESTS = Gauge("nebula_scheduler_requests", "Model requests by status.", ["status"])
PENDING = Gauge(
    "nebula_scheduler_pending_replicas",
    "Replicas that fit nowhere, by model and reason.",
    ["model", "reason"],
)
NODES = Gauge(
    "nebula_scheduler_nodes", "Nodes by state (alive, cordoned, draining, dead).", ["state"]
)

NODES_LOST = Counter(
    "nebula_scheduler_nodes_lost",
    "Nodes declared dead (heartbeat lapsed past node_ttl_s and any grace); their replicas "
    "are rescheduled.",
)
IDLE_UNLOADS = Counter(
    "nebula_scheduler_idle_unloads",
    "Models unloaded for idling past their keep-alive (and failed on-demand loads removed "
    "one keep-alive after they failed), by model.",
    ["model"],
)
EVICTIONS = Counter(
    "nebula_scheduler_evictions",
    "Idle models unloaded to make room for a load that fit nowhere, by evicted model.",
    ["model"],
)
REPLICAS_DESIRED = Gauge(
    "nebula_scheduler_replicas_desired",
    "Replicas each model's request asks for now (autoscaling moves it within its range).",
    ["model"],
)
REPLICAS_READY = Gauge(
    "nebula_scheduler_replicas_ready", "Healthy replicas of each model.", ["model"]
)
DEMAND = Gauge(
    "nebula_scheduler_demand",
    "Requests in flight or waiting in the routers, per autoscaled model.",
    ["model"],
)
SCALE_EVENTS = Counter(
    "nebula_scheduler_scale_events",
    "Autoscaling changes of a model's replicas, by direction (out, in).",
    ["model", "direction"],
)

_pending_labels: set[tuple[str, str]] = set()
_replica_models: set[str] = set()
_demand_models: set[str] = set()


def clear() -> None:
    """Drop the cluster gauges: a scheduler that is not the leader has no picture of it."""
    REQUESTS.clear()
    NODES.clear()
    PENDING.clear()
    _pending_labels.clear()
    REPLICAS_DESIRED.clear()
    REPLICAS_READY.clear()
    DEMAND.clear()
    _replica_models.clear()
    _demand_models.clear()


def reason_kind(text: str) -> str:
    """A short, bounded label for a pending reason."""
    if "no live nodes" in text:
        return "no_nodes"
    if "cordoned" in text:
        return "cordoned"
    if "GPU" in text:
        return "no_gpu_room"
    return "no_cpu_room"


def record(snap: Snapshot, pending: dict[str, tuple[str, ...]]) -> None:
    """Set the gauges from a pass's snapshot and its pending replicas."""
    counts = Tally(r.status.value for r in snap.requests.values())
    for status in Status:
        REQUESTS.labels(status.value).set(counts.get(status.value, 0))
    cordoned, draining = snap.marks
    NODES.labels("alive").set(len(snap.alive))
    NODES.labels("dead").set(len(snap.node_ids - snap.alive))
    NODES.labels("cordoned").set(len(cordoned & snap.alive))
    NODES.labels("draining").set(len(draining & snap.alive))
    now: Tally[tuple[str, str]] = Tally()
    for request_id, reasons in pending.items():
        request = snap.requests.get(request_id)
        if request is not None:
            for reason in reasons:
                now[request.model, reason_kind(reason)] += 1
    for labels in _pending_labels - now.keys():
        PENDING.remove(*labels)
    for labels, n in now.items():
        PENDING.labels(*labels).set(n)
    _pending_labels.clear()
    _pending_labels.update(now)


def record_replicas(desired: dict[str, int], ready: dict[str, int], demand: dict[str, int]) -> None:
    """Replicas asked for and healthy per model; demand per autoscaled model."""
    for model in _replica_models - desired.keys():
        REPLICAS_DESIRED.remove(model)
        REPLICAS_READY.remove(model)
    for model, n in desired.items():
        REPLICAS_DESIRED.labels(model).set(n)
        REPLICAS_READY.labels(model).set(ready.get(model, 0))
    _replica_models.clear()
    _replica_models.update(desired)
    for model in _demand_models - demand.keys():
        DEMAND.remove(model)
    for model, n in demand.items():
        DEMAND.labels(model).set(n)
    _demand_models.clear()
    _demand_models.update(demand)

"""The node agent's Prometheus metrics: the node's GPUs (or RAM) and its engines."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from nebula.models import Node, Phase

GPU_LABELS = ["node", "gpu", "name"]
GPU_MEMORY_USED = Gauge("nebula_node_gpu_memory_used_bytes", "GPU memory in use.", GPU_LABELS)
GPU_MEMORY_TOTAL = Gauge("nebula_node_gpu_memory_total_bytes", "GPU memory.", GPU_LABELS)
GPU_UTILIZATION = Gauge("nebula_node_gpu_utilization_ratio", "GPU busy time, 0 to 1.", GPU_LABELS)
GPU_TEMPERATURE = Gauge("nebula_node_gpu_temperature_celsius", "GPU temperature.", GPU_LABELS)
GPU_POWER = Gauge("nebula_node_gpu_power_watts", "GPU power draw.", GPU_LABELS)
RAM_TOTAL = Gauge("nebula_node_ram_total_bytes", "The node's RAM.", ["node"])
RAM_AVAILABLE = Gauge("nebula_node_ram_available_bytes", "The node's available RAM.", ["node"])

KV_EVENTS = Counter(
    "nebula_agent_kv_events",
    "KV-cache events read from the node's engines (precise prefix routing), by kind: "
    "stored, removed, cleared.",
    ["kind"],
)
ENGINE_LABELS = ["node", "model", "placement"]
ENGINE_STATE = Gauge(
    "nebula_engine_state",
    "1 for the phase each engine is in (Starting, Healthy, Failed, Stopping).",
    [*ENGINE_LABELS, "state"],
)
ENGINE_RESTARTS = Gauge(
    "nebula_engine_restarts", "Times each engine crashed and was restarted.", ENGINE_LABELS
)
PROBE_SECONDS = Histogram(
    "nebula_engine_probe_seconds",
    "Health probe round trips.",
    ["node"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
)

MIB = 1024 * 1024
_engines: set[tuple[str, str, str]] = set()


def record_node(node: Node) -> None:
    for d in node.devices:
        labels = (node.id, str(d.index), d.name)
        GPU_MEMORY_USED.labels(*labels).set(d.memory_used_mib * MIB)
        GPU_MEMORY_TOTAL.labels(*labels).set(d.memory_total_mib * MIB)
        GPU_UTILIZATION.labels(*labels).set(d.utilization_pct / 100)
        if d.temperature_c is not None:
            GPU_TEMPERATURE.labels(*labels).set(d.temperature_c)
        if d.power_w is not None:
            GPU_POWER.labels(*labels).set(d.power_w)
    RAM_TOTAL.labels(node.id).set(node.ram_total_mib * MIB)
    RAM_AVAILABLE.labels(node.id).set(node.ram_available_mib * MIB)


def record_engines(node_id: str, engines: dict[str, tuple[str, Phase, int]]) -> None:
    """`engines`: placement id -> (model, phase, restarts); gone ones leave the metrics."""
    now = {(node_id, model, pid) for pid, (model, _, _) in engines.items()}
    for labels in _engines - now:
        ENGINE_RESTARTS.remove(*labels)
        for phase in Phase:
            if phase is not Phase.STOPPED:
                ENGINE_STATE.remove(*labels, phase.value)
    for pid, (model, phase, restarts) in engines.items():
        labels = (node_id, model, pid)
        for candidate in Phase:
            if candidate is not Phase.STOPPED:
                ENGINE_STATE.labels(*labels, candidate.value).set(1 if candidate is phase else 0)
        ENGINE_RESTARTS.labels(*labels).set(restarts)
    _engines.clear()
    _engines.update(now)

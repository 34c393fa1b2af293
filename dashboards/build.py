"""Builds Nebula's Grafana dashboards (the JSON files beside this script).

    .venv/bin/python dashboards/build.py

The panels are defined here once, as data; the JSON is generated, so a query
is changed in one place and the dashboards stay consistent. Every query is run
against a real Prometheus scraping a live stack in tests/test_observability.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DATASOURCE = {"type": "prometheus", "uid": "nebula-prometheus"}

# (title, unit, [(expr, legend)], kind); kind "stat" or "timeseries"
Panel = tuple[str, str, list[tuple[str, str]], str]

DASHBOARDS: dict[str, dict[str, Any]] = {
    "cluster": {
        "title": "Nebula / Cluster overview",
        "panels": [
            ("Nodes alive", "none", [('nebula_scheduler_nodes{state="alive"}', "alive")], "stat"),
            ("Nodes by state", "none", [("nebula_scheduler_nodes", "{{state}}")], "timeseries"),
            (
                "Model requests by status",
                "none",
                [("sum by (status) (nebula_scheduler_requests)", "{{status}}")],
                "timeseries",
            ),
            (
                "Pending replicas",
                "none",
                [
                    (
                        "sum by (model, reason) (nebula_scheduler_pending_replicas)",
                        "{{model}}: {{reason}}",
                    )
                ],
                "timeseries",
            ),
            ("Scheduler leader", "none", [("nebula_scheduler_leader", "{{nebula_id}}")], "stat"),
            (
                "Reconcile pass p95",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (le) "
                        "(rate(nebula_scheduler_pass_seconds_bucket[1m])))",
                        "p95",
                    )
                ],
                "timeseries",
            ),
            (
                "GPU memory used",
                "percentunit",
                [
                    (
                        "sum by (node, gpu) (nebula_node_gpu_memory_used_bytes) / sum by (node, gpu) "
                        "(nebula_node_gpu_memory_total_bytes)",
                        "{{node}} GPU {{gpu}}",
                    )
                ],
                "timeseries",
            ),
            (
                "GPU utilisation",
                "percentunit",
                [("nebula_node_gpu_utilization_ratio", "{{node}} GPU {{gpu}}")],
                "timeseries",
            ),
            (
                "GPU temperature",
                "celsius",
                [("nebula_node_gpu_temperature_celsius", "{{node}} GPU {{gpu}}")],
                "timeseries",
            ),
            (
                "GPU power",
                "watt",
                [("nebula_node_gpu_power_watts", "{{node}} GPU {{gpu}}")],
                "timeseries",
            ),
            (
                "RAM used (CPU nodes)",
                "percentunit",
                [("1 - nebula_node_ram_available_bytes / nebula_node_ram_total_bytes", "{{node}}")],
                "timeseries",
            ),
            (
                "Engines by phase",
                "none",
                [("sum by (state) (nebula_engine_state)", "{{state}}")],
                "timeseries",
            ),
            (
                "Engine restarts",
                "none",
                [("sum by (model, node) (nebula_engine_restarts)", "{{model}} on {{node}}")],
                "timeseries",
            ),
        ],
    },
    "traffic": {
        "title": "Nebula / Traffic",
        "panels": [
            (
                "Routing decisions (cached, spread, new, overflow by load, least outstanding; "
                "precise: the engine reports its evictions)",
                "reqps",
                [
                    (
                        "sum by (model, decision, index) "
                        "(rate(nebula_router_routing_decisions_total[1m]))",
                        "{{model}}: {{decision}} ({{index}})",
                    )
                ],
                "timeseries",
            ),
            (
                "Cached prefix of the chosen replica (characters, as the index knows)",
                "none",
                [
                    (
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(nebula_router_prefix_matched_chars_bucket[5m])))",
                        f"p{p}",
                    )
                    for q, p in ((0.5, 50), (0.9, 90))
                ],
                "timeseries",
            ),
            (
                "Prefix index: keys remembered, keys shared between routers",
                "none",
                [
                    ("max(nebula_router_prefix_index_keys)", "remembered (per process)"),
                    (
                        "sum by (direction) (rate(nebula_router_prefix_feed_keys_total[5m]))",
                        "{{direction}} per second",
                    ),
                ],
                "timeseries",
            ),
            (
                "Requests per second",
                "reqps",
                [("sum by (model) (rate(nebula_router_requests_total[1m]))", "{{model}}")],
                "timeseries",
            ),
            (
                "Errors per second",
                "reqps",
                [
                    (
                        'sum by (status) (rate(nebula_router_requests_total{status=~"4..|5.."}[1m]))',
                        "{{status}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Latency p50 / p95 / p99",
                "s",
                [
                    (
                        f"histogram_quantile({q}, sum by (le, model) "
                        f"(rate(nebula_router_request_duration_seconds_bucket[1m])))",
                        f"{{{{model}}}} p{p}",
                    )
                    for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))
                ],
                "timeseries",
            ),
            (
                "Time to first token p50 / p95",
                "s",
                [
                    (
                        f"histogram_quantile({q}, sum by (le, model) "
                        f"(rate(nebula_router_time_to_first_token_seconds_bucket[1m])))",
                        f"{{{{model}}}} p{p}",
                    )
                    for q, p in ((0.5, 50), (0.95, 95))
                ],
                "timeseries",
            ),
            (
                "In flight",
                "none",
                [("sum by (model) (nebula_router_in_flight)", "{{model}}")],
                "timeseries",
            ),
            (
                "Tokens per second (reported usage)",
                "none",
                [
                    (
                        "sum by (model, kind) (rate(nebula_router_tokens_total[1m]))",
                        "{{model}} {{kind}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Tokens per second by client key",
                "none",
                [
                    (
                        "sum by (key) (rate(nebula_router_key_tokens_total[5m]))",
                        "{{key}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Requests refused: token budget spent",
                "none",
                [
                    (
                        "sum by (key) (rate(nebula_router_budget_refusals_total[5m]))",
                        "{{key}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Retries and upstream errors",
                "none",
                [
                    ("sum by (model) (rate(nebula_router_retries_total[5m]))", "{{model}} retries"),
                    ("sum by (kind) (rate(nebula_router_upstream_errors_total[5m]))", "{{kind}}"),
                ],
                "timeseries",
            ),
            (
                "On-demand loads (last hour)",
                "none",
                [
                    (
                        "sum by (model) (increase(nebula_router_on_demand_loads_total[1h]))",
                        "{{model}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Requests held while their model loads",
                "none",
                [("sum by (model) (nebula_router_held_requests)", "{{model}}")],
                "timeseries",
            ),
            (
                "Hold time p95 (served holds)",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, model) "
                        "(rate(nebula_router_hold_seconds_bucket[5m])))",
                        "{{model}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Holds timed out or refused, idle unloads, evictions (last hour)",
                "none",
                [
                    (
                        "sum(increase(nebula_router_hold_timeouts_total[1h])) or vector(0)",
                        "holds timed out (503)",
                    ),
                    (
                        "sum(increase(nebula_router_holds_refused_total[1h])) or vector(0)",
                        "holds refused, queue full (429)",
                    ),
                    (
                        "sum by (model) (increase(nebula_scheduler_idle_unloads_total[1h]))"
                        " or vector(0)",
                        "idle unloads {{model}}",
                    ),
                    (
                        "sum by (model) (increase(nebula_scheduler_evictions_total[1h]))"
                        " or vector(0)",
                        "evicted {{model}}",
                    ),
                ],
                "timeseries",
            ),
            (
                "Healthy replicas in the routing table",
                "none",
                [("max by (model) (nebula_router_endpoints)", "{{model}}")],
                "timeseries",
            ),
            (
                "Requests waiting for a free replica (flow control), by band",
                "none",
                [
                    (
                        "sum by (model, band) (nebula_router_queued_requests) or vector(0)",
                        "{{model}} {{band}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Queue wait p95 by band",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, model, band) "
                        "(rate(nebula_router_queue_wait_seconds_bucket[5m]))) or vector(0)",
                        "{{model}} {{band}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Flow-control refusals (queue_full 429, queue_timeout 503)",
                "reqps",
                [
                    (
                        "sum by (model, reason) (rate(nebula_router_queue_refusals_total[5m]))"
                        " or vector(0)",
                        "{{model}} {{reason}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Replicas desired vs ready",
                "none",
                [
                    ("sum by (model) (nebula_scheduler_replicas_desired)", "desired {{model}}"),
                    ("sum by (model) (nebula_scheduler_replicas_ready)", "ready {{model}}"),
                ],
                "timeseries",
            ),
            (
                "Autoscaling: demand (in flight + waiting) and scale events",
                "none",
                [
                    ("sum by (model) (nebula_scheduler_demand) or vector(0)", "demand {{model}}"),
                    (
                        "sum by (model, direction) "
                        "(increase(nebula_scheduler_scale_events_total[1h])) or vector(0)",
                        "scaled {{direction}} {{model}}",
                    ),
                ],
                "timeseries",
            ),
        ],
    },
    "engines": {
        "title": "Nebula / Engines (vLLM)",
        "panels": [
            (
                "Requests running",
                "none",
                [("sum by (model, node) (vllm:num_requests_running)", "{{model}} on {{node}}")],
                "timeseries",
            ),
            (
                "Requests waiting",
                "none",
                [("sum by (model, node) (vllm:num_requests_waiting)", "{{model}} on {{node}}")],
                "timeseries",
            ),
            (
                "KV cache used",
                "percentunit",
                [("max by (model, node) (vllm:kv_cache_usage_perc)", "{{model}} on {{node}}")],
                "timeseries",
            ),
            (
                "Generated tokens per second",
                "none",
                [("sum by (model) (rate(vllm:generation_tokens_total[1m]))", "{{model}}")],
                "timeseries",
            ),
            (
                "Prompt tokens per second",
                "none",
                [("sum by (model) (rate(vllm:prompt_tokens_total[1m]))", "{{model}}")],
                "timeseries",
            ),
            (
                "Prefix cache hit rate (vLLM)",
                "percentunit",
                [
                    (
                        "sum by (model, placement) (rate(vllm:prefix_cache_hits_total[5m])) / "
                        "sum by (model, placement) (rate(vllm:prefix_cache_queries_total[5m]))",
                        "{{model}} {{placement}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Health probe p95",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, node) "
                        "(rate(nebula_engine_probe_seconds_bucket[1m])))",
                        "{{node}}",
                    )
                ],
                "timeseries",
            ),
        ],
    },
    "model": {
        "title": "Nebula / Model",
        "variable": "model",
        "panels": [
            (
                "Requests per second",
                "reqps",
                [
                    (
                        'sum by (status) (rate(nebula_router_requests_total{model="$model"}[1m]))',
                        "{{status}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Latency p50 / p95",
                "s",
                [
                    (
                        f"histogram_quantile({q}, sum by (le) (rate("
                        f'nebula_router_request_duration_seconds_bucket{{model="$model"}}[1m])))',
                        f"p{p}",
                    )
                    for q, p in ((0.5, 50), (0.95, 95))
                ],
                "timeseries",
            ),
            (
                "Time to first token p95",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (le) (rate("
                        'nebula_router_time_to_first_token_seconds_bucket{model="$model"}[1m])))',
                        "p95",
                    )
                ],
                "timeseries",
            ),
            (
                "Healthy replicas",
                "none",
                [('max(nebula_router_endpoints{model="$model"})', "replicas")],
                "stat",
            ),
            (
                "Engines by phase",
                "none",
                [('sum by (state) (nebula_engine_state{model="$model"})', "{{state}}")],
                "timeseries",
            ),
            (
                "Requests running per replica",
                "none",
                [('vllm:num_requests_running{model="$model"}', "{{placement}} on {{node}}")],
                "timeseries",
            ),
            (
                "Generated tokens per second",
                "none",
                [('sum(rate(vllm:generation_tokens_total{model="$model"}[1m]))', "tokens/s")],
                "timeseries",
            ),
        ],
    },
}


def panel(i: int, spec: Panel) -> dict[str, Any]:
    title, unit, queries, kind = spec
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"x": (i % 2) * 12, "y": (i // 2) * 8, "w": 12, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {
                "refId": chr(ord("A") + j),
                "expr": expr,
                "legendFormat": legend,
                "datasource": DATASOURCE,
            }
            for j, (expr, legend) in enumerate(queries)
        ],
    }


def dashboard(uid: str, spec: dict[str, Any]) -> dict[str, Any]:
    variables = []
    if spec.get("variable") == "model":
        variables.append(
            {
                "name": "model",
                "label": "Model",
                "type": "query",
                "datasource": DATASOURCE,
                "query": {
                    "query": "label_values(nebula_router_requests_total, model)",
                    "refId": "model",
                },
                "definition": "label_values(nebula_router_requests_total, model)",
                "refresh": 2,
                "includeAll": False,
            }
        )
    return {
        "uid": f"nebula-{uid}",
        "title": spec["title"],
        "tags": ["nebula"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "panels": [panel(i, p) for i, p in enumerate(spec["panels"])],
    }


def main() -> None:
    for uid, spec in DASHBOARDS.items():
        path = HERE / f"{uid}.json"
        path.write_text(json.dumps(dashboard(uid, spec), indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

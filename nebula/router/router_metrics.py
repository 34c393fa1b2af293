"""The router's Prometheus metrics (`nebula_router_*`).

The ones every request touches (requests, latency, time to first token, routing
decisions, tokens) are counted by `tally`, without locks. The others are
prometheus_client's; with several worker processes its multiprocess mode sums
them, and `nebula router` sets that up before this module is imported.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from nebula.router.tally import Tally

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
TALLY = Tally(MULTIPROCESS_DIR)
if MULTIPROCESS_DIR is None:
    REGISTRY.register(TALLY.collector())

REQUESTS = TALLY.family(
    "nebula_router_requests",
    "Requests answered, by model, route and HTTP status.",
    ["model", "route", "status"],
)
LATENCY = TALLY.family(
    "nebula_router_request_duration_seconds",
    "Time from a request's arrival to the last byte of its answer.",
    ["model", "route"],
    buckets=LATENCY_BUCKETS,
)
TTFT = TALLY.family(
    "nebula_router_time_to_first_token_seconds",
    "Time from a streamed request's arrival to its first chunk.",
    ["model", "route"],
    buckets=TTFT_BUCKETS,
)
IN_FLIGHT = Gauge(
    "nebula_router_in_flight",
    "Requests being answered now (sampled every second).",
    ["model"],
    multiprocess_mode="livesum",
)
ENDPOINTS = Gauge(
    "nebula_router_endpoints",
    "Healthy replicas in this router's routing table (sampled every second).",
    ["model"],
    multiprocess_mode="max",
)
RETRIES = Counter(
    "nebula_router_retries",
    "Requests sent again to another replica after a failure before the first byte.",
    ["model"],
)
UPSTREAM_ERRORS = Counter(
    "nebula_router_upstream_errors",
    "Failures talking to engines, by kind (connect, status_5xx, timeout, broken_stream).",
    ["model", "kind"],
)
EJECTIONS = Counter(
    "nebula_router_ejections",
    "Replicas left out of routing for a while after a connect to them failed.",
    ["model"],
)
TOKENS = TALLY.family(
    "nebula_router_tokens",
    "Tokens reported in answers' usage, by kind (prompt, completion).",
    ["model", "kind"],
)
KEY_TOKENS = TALLY.family(
    "nebula_router_key_tokens",
    "Tokens reported in answers' usage, by client key name (operator-defined; 'open' on "
    "a router without keys), model and kind (prompt, completion).",
    ["key", "model", "kind"],
)
BUDGET_REFUSALS = Counter(
    "nebula_router_budget_refusals",
    "Requests refused (429 budget_exhausted) because their key's token budget was spent.",
    ["key"],
)
ROUTING = TALLY.family(
    "nebula_router_routing_decisions",
    "How replicas were chosen: cached (a replica that holds the prompt's longest known "
    "prefix), spread (a new conversation on a shared prefix), new (no part of the prompt "
    "known), overflow (the holders were over the load bound), least_outstanding (no "
    "prefix policy, or not a chat or completion); index: precise where the chosen "
    "replica's engine reports its evictions, else approximate (none: no prefix policy).",
    ["model", "decision", "index"],
)
PREFIX_MATCHED = TALLY.family(
    "nebula_router_prefix_matched_chars",
    "Characters of the prompt that the chosen replica holds in its cache, as far as "
    "the prefix index knows (0: a new prompt or an overflow).",
    (),
    buckets=(0, 256, 1024, 4096, 16384, 65536),
)
PREFIX_INDEX_KEYS = Gauge(
    "nebula_router_prefix_index_keys",
    "Prefix keys this router process remembers (bounded by prefix_index_keys).",
    multiprocess_mode="max",
)
PREFIX_FEED = Counter(
    "nebula_router_prefix_feed_keys",
    "Prefix keys shared with other routers: sent (this process's choices) and learned (theirs).",
    ["direction"],
)

ON_DEMAND_LOADS = Counter(
    "nebula_router_on_demand_loads",
    "Loads this router asked for because a request named a catalog model not loaded.",
    ["model"],
)
HELD = Gauge(
    "nebula_router_held_requests",
    "Requests held while their model loads.",
    ["model"],
    multiprocess_mode="livesum",
)
HOLD_SECONDS = Histogram(
    "nebula_router_hold_seconds",
    "How long held requests waited for their model to load (served ones).",
    ["model"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
HOLD_TIMEOUTS = Counter(
    "nebula_router_hold_timeouts",
    "Held requests answered 503 because their model was still loading after hold_timeout_s.",
    ["model"],
)
HOLDS_REFUSED = Counter(
    "nebula_router_holds_refused",
    "Requests answered 429 because hold_queue_limit requests already waited for the model.",
    ["model"],
)

QUEUED = Gauge(
    "nebula_router_queued_requests",
    "Requests waiting in the router for a free replica (flow control), by priority band.",
    ["model", "band"],
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "nebula_router_queue_wait_seconds",
    "How long requests let through by flow control waited for a free replica.",
    ["model", "band"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
QUEUE_REFUSALS = Counter(
    "nebula_router_queue_refusals",
    "Requests refused by flow control: queue_full (429) or queue_timeout (503).",
    ["model", "reason"],
)


class Labels:
    """The hot metrics' series, made once each (a lookup, then an addition per write)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], Any] = {}
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._decisions: dict[tuple[str, str, str], Any] = {}
        self._prefix_matched: Any = None

    def get(self, model: str, route: str) -> Any:
        entry = self._cache.get((model, route))
        if entry is None:
            entry = self._cache[model, route] = (
                TALLY.histogram(LATENCY, model, route),
                TALLY.histogram(TTFT, model, route),
            )
        return entry

    def requests(self, model: str, route: str, status: int) -> Any:
        child = self._requests.get((model, route, status))
        if child is None:
            child = self._requests[model, route, status] = TALLY.counter(
                REQUESTS, model, route, str(status)
            )
        return child

    def decision(self, model: str, decision: str, index: str = "none") -> Any:
        child = self._decisions.get((model, decision, index))
        if child is None:
            child = self._decisions[model, decision, index] = TALLY.counter(
                ROUTING, model, decision, index
            )
        return child

    def prefix_matched(self) -> Any:
        if self._prefix_matched is None:
            self._prefix_matched = TALLY.histogram(PREFIX_MATCHED)
        return self._prefix_matched


def exposition() -> bytes:
    """The metrics page: this process's, or every worker's merged in multiprocess mode."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry: Any = REGISTRY
    if MULTIPROCESS_DIR is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(TALLY.collector())
    return bytes(generate_latest(registry))


_token_children: dict[tuple[str, str, str], Any] = {}


def count_tokens(key: str, model: str, prompt: int, completion: int) -> None:
    """An answer's tokens, by model and by key (children made once each)."""
    for kind, n in (("prompt", prompt), ("completion", completion)):
        if n <= 0:
            continue
        children = _token_children.get((key, model, kind))
        if children is None:
            children = _token_children[key, model, kind] = (
                TALLY.counter(TOKENS, model, kind),
                TALLY.counter(KEY_TOKENS, key, model, kind),
            )
        children[0].inc(n)
        children[1].inc(n)

"""Every Redis key and channel Nebula uses, and nothing else spells one.

See docs/architecture.md for each key's type, writer, reader and TTL.
"""

PREFIX = "nebula:"

# Pub/sub channel: "something changed", a wake-up only. Every loop is also
# correct when it only polls, so a lost message costs latency, never state.
EVENTS_CHANNEL = PREFIX + "events"


def node_channel(node_id: str) -> str:
    """Pub/sub channel: "your placements changed", for one node's agent only."""
    return f"{PREFIX}events:node:{node_id}"


# Model requests (desired state).
REQUESTS = PREFIX + "requests"  # set of request ids
MODELS = PREFIX + "models"  # hash: served model name -> request id (one request per model)
# Set of served model names being unloaded (routers tell clients so, instead of "retry").
UNLOADING = PREFIX + "unloading"
# Sorted set: served model name -> when a router last saw a request for it (unix
# seconds; a model with requests in flight or held is "used now"). Routers batch
# it (ZADD GT, once a second); the scheduler's idle unloads and evictions read it.
LAST_USED = PREFIX + "last-used"
# Set of request ids changed by someone other than the scheduler (load, unload):
# the scheduler re-reads just these each pass instead of every request.
REQUESTS_DIRTY = PREFIX + "requests:dirty"


def request(request_id: str) -> str:
    """Hash: one model request (model, spec, replicas, status, message, timestamps)."""
    return f"{PREFIX}request:{request_id}"


def request_events(request_id: str) -> str:
    """Stream, capped: the request's event history."""
    return f"{PREFIX}request-events:{request_id}"


# Nodes.
NODES = PREFIX + "nodes"  # set of node ids ever seen and not yet reaped
CORDONED = PREFIX + "cordoned"  # set: nodes that take no new placements
DRAINING = PREFIX + "draining"  # set: nodes whose placements are moved off


def node(node_id: str) -> str:
    """Hash with a TTL: the node's heartbeat. Its expiry is the node's death."""
    return f"{PREFIX}node:{node_id}"


def placements(node_id: str) -> str:
    """Hash: placement id -> placement JSON, the node's desired state (scheduler writes)."""
    return f"{PREFIX}placements:{node_id}"


# Set of node ids whose agents changed placement states since the scheduler's last pass.
PLACEMENT_STATE_DIRTY = PREFIX + "placement-state:dirty"


def placement_state(node_id: str) -> str:
    """Hash: placement id -> observed state JSON (the node's agent writes)."""
    return f"{PREFIX}placement-state:{node_id}"


# Endpoints the routers route to, and the feed of their changes (store/endpoints.py).
ENDPOINT_INDEX = PREFIX + "endpoint-index"  # hash: placement id -> endpoint JSON
ENDPOINT_SEQ = PREFIX + "endpoint-seq"  # counter: bumped by every endpoint change
ENDPOINT_FEED = PREFIX + "endpoint-feed"  # stream, entry id "{seq}-0": op, id, endpoint


def node_endpoints(node_id: str) -> str:
    """Set: the placement ids of a node's endpoints."""
    return f"{PREFIX}node-endpoints:{node_id}"


# The endpoints as Nebula wrote them before the change feed, for routers not yet
# upgraded (written only with `legacy_endpoints`): a string per endpoint with a
# TTL, refreshed every probe, and a sorted set index scored by expiry in ms.
LEGACY_ENDPOINTS = PREFIX + "endpoints"


def legacy_endpoint(placement_id: str) -> str:
    return f"{PREFIX}endpoint:{placement_id}"


# Counter: bumped whenever what routers know besides endpoints changes (a model
# loaded, unloading or gone; an API key created or deleted). It versions the API
# keys as much as the models: its name is older than the keys, and kept (a rename
# would make routers of two versions read two counters during an upgrade).
ROUTING_VERSION = PREFIX + "routing-version"


# API keys for /v1, stored hashed: hash key name -> JSON {v, name, digest (sha256
# hex of the key), rate_per_s, created_at, models, on_demand, priority,
# token_budget, budget_period} (store/api_keys.py; never the key itself).
API_KEYS = PREFIX + "api-keys"


def usage(day: str) -> str:
    """Hash, expiring after the retention: one UTC day's tokens and requests,
    "{key name}|{model}|{p, c or n}" -> prompt tokens, completion tokens, requests."""
    return f"{PREFIX}usage:{day}"


def spend(key_name: str, period: str) -> str:
    """String (a counter), expiring a day after its period: the tokens a key with a
    budget spent in one budget period ("2026-12-02" or "2026-12")."""
    return f"{PREFIX}spend:{key_name}:{period}"


def rate_limit(key_digest: str) -> str:
    """String with a TTL: a client key's rate-limit state (GCRA's theoretical arrival
    time, in ms), shared by every router worker and router."""
    return f"{PREFIX}rate:{key_digest}"


# Every Nebula process's /metrics address, for Prometheus' discovery:
# hash "kind:id" -> JSON {kind, id, address, expires_at}; entries past expires_at are dead.
METRICS_TARGETS = PREFIX + "metrics-targets"

# Scheduler leadership: SET NX PX, value = the leader's identity.
SCHEDULER_LEADER = PREFIX + "scheduler:leader"


# What routers have in flight to each engine: the drain's second witness
# (store/inflight.py). A sorted set of router processes (member: instance id,
# score: unix time of its last report), and per router process a hash with a TTL,
# placement id -> requests in flight, written once a second while not empty.
ROUTER_IN_FLIGHT = PREFIX + "router-in-flight"


def router_in_flight(instance: str) -> str:
    return f"{PREFIX}router-in-flight:{instance}"


# Flow control and autoscaling (store/demand.py): one hash, router process ->
# JSON of its demand per model and priority band, with the time of the report.
# Written by each router process every second; stale fields are ignored and
# trimmed by readers.
ROUTER_DEMAND = PREFIX + "router-demand"


# Prefix routing's shared index (store/prefixes.py): a capped stream; each entry
# is one router process's new prefix keys for one replica (fields i, p, k).
PREFIX_FEED = PREFIX + "prefix-feed"


def engine_load(node_id: str) -> str:
    """Hash with a TTL: placement id -> what the node's engines last reported of
    their load ("running waiting kv_usage"); the agent writes it every probe."""
    return f"{PREFIX}engine-load:{node_id}"

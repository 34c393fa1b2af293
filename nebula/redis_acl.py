"""Least privilege in Redis: one ACL user per role, each writing only its own keys.

Whoever holds a Redis password used to hold the cluster: any Nebula process
could write placements (what nodes run), API keys and endpoints. With these
users (`nebula redis-acl` writes them as an ACL file), a leaked router password
cannot write a placement, a node's cannot create an API key or a model request,
and none can run a dangerous command (FLUSHALL, CONFIG, DEBUG, MODULE, ...).

Every role reads every Nebula key (the state is one shared document; the
secrets in it are hashes), and writes only:

| user       | writes                                                              |
|------------|---------------------------------------------------------------------|
| scheduler  | model requests' status and events, placements, the leader lease,    |
|            | dead nodes' endpoints and marks                                     |
| agent      | its node's heartbeat, placement states, endpoints, engine loads,   |
|            | KV-cache evictions (the prefix feed)                                |
| router     | rate limits, token usage and spend, last use, the prefix feed, what |
|            | it has in flight, on-demand model requests                          |
| admin      | what a router writes, plus API keys and node cordon and drain marks |

`--nodes a,b` makes one agent user per node (`agent-a`, ...) whose node-scoped
keys (heartbeat, placement states, engine loads) are its own node's only. The
endpoint index is shared by every node (one hash, one feed), so an agent can
still write another node's endpoint; routers route only to an endpoint at the
address its node registered, which the other node's heartbeat key holds and
an agent user cannot write.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from nebula import redis_keys
from nebula.names import check_name

P = redis_keys.PREFIX
# Every command Nebula sends is in these categories; -@dangerous then takes away
# FLUSHALL, CONFIG, DEBUG, KEYS, MONITOR, ACL, SHUTDOWN... ROLE is "dangerous" only
# as an admin command that reads: routers and the health watch ask it.
COMMANDS = (
    "-@all +@read +@write +@keyspace +@pubsub +@transaction +@connection +@scripting "
    "-@dangerous -function +role"
)
CHANNELS = (redis_keys.EVENTS_CHANNEL, redis_keys.node_channel("*"))

REQUESTS = [
    redis_keys.request("*"),
    redis_keys.request_events("*"),
    redis_keys.REQUESTS,
    redis_keys.MODELS,
    redis_keys.UNLOADING,
    redis_keys.REQUESTS_DIRTY,
    redis_keys.ROUTING_VERSION,
]
ENDPOINTS = [
    redis_keys.ENDPOINT_INDEX,
    redis_keys.ENDPOINT_SEQ,
    redis_keys.ENDPOINT_FEED,
    redis_keys.node_endpoints("*"),
    redis_keys.LEGACY_ENDPOINTS,
    redis_keys.legacy_endpoint("*"),
]
ROUTER = [
    *REQUESTS,
    redis_keys.LAST_USED,
    redis_keys.rate_limit("*"),
    redis_keys.usage("*"),
    redis_keys.spend("*", "*"),
    redis_keys.PREFIX_FEED,
    redis_keys.ROUTER_IN_FLIGHT,
    redis_keys.router_in_flight("*"),
    redis_keys.METRICS_TARGETS,
]


def writes(role: str, node: str = "*") -> list[str]:
    """The key patterns `role` may write (`node`: an agent's own node, or every node)."""
    if role == "scheduler":
        return [
            *REQUESTS,
            redis_keys.LAST_USED,
            redis_keys.placements("*"),
            redis_keys.placement_state("*"),
            redis_keys.PLACEMENT_STATE_DIRTY,
            *ENDPOINTS,
            redis_keys.NODES,
            redis_keys.node("*"),
            redis_keys.CORDONED,
            redis_keys.DRAINING,
            redis_keys.SCHEDULER_LEADER,
            redis_keys.METRICS_TARGETS,
        ]
    if role == "agent":
        return [
            redis_keys.node(node),
            redis_keys.NODES,
            redis_keys.placement_state(node),
            redis_keys.PLACEMENT_STATE_DIRTY,
            *ENDPOINTS,
            redis_keys.engine_load(node),
            redis_keys.PREFIX_FEED,
            redis_keys.ROUTER_IN_FLIGHT,
            redis_keys.METRICS_TARGETS,
        ]
    if role == "router":
        return ROUTER
    if role == "admin":
        return [*ROUTER, redis_keys.API_KEYS, redis_keys.CORDONED, redis_keys.DRAINING]
    raise ValueError(f"no role {role!r}; roles: scheduler, agent, router, admin")


ROLES = ("scheduler", "agent", "router", "admin")


def user_line(name: str, password: str, role: str, node: str = "*") -> str:
    digest = hashlib.sha256(password.encode()).hexdigest()
    # Read-write (~): INCR, HSETNX, scripts need both on one pattern.
    patterns = " ".join(f"~{p}" for p in writes(role, node))
    channels = " ".join(f"&{c}" for c in CHANNELS)
    return f"user {name} on #{digest} %R~{P}* {patterns} {channels} {COMMANDS}"


def users(nodes: Iterable[str] = ()) -> list[tuple[str, str, str]]:
    """(user name, role, node) of each user: one per role, or one agent per node."""
    nodes = list(nodes)
    out = [(role, role, "*") for role in ROLES if role != "agent" or not nodes]
    out += [(f"agent-{node}", "agent", node) for node in nodes]
    return out


def acl_file(nodes: Iterable[str] = ()) -> tuple[str, dict[str, str]]:
    """An ACL file (passwords stored as SHA-256 only) and each user's new password.
    The default user is turned off; `nebula-ops` may do anything (for the operator)."""
    passwords = {name: secrets.token_urlsafe(24) for name, _, _ in users(nodes)}
    passwords["nebula-ops"] = secrets.token_urlsafe(24)
    lines = ["user default off"]  # an ACL file takes no comments
    lines += [user_line(name, passwords[name], role, node) for name, role, node in users(nodes)]
    ops = hashlib.sha256(passwords["nebula-ops"].encode()).hexdigest()
    lines.append(f"user nebula-ops on #{ops} ~* &* +@all")
    return "\n".join(lines) + "\n", passwords


def with_user(url: str, user: str, password: str) -> str:
    """`url` (any of Nebula's Redis URL forms) with `user`'s credentials in it."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme == "unix":
        raise ValueError(f"cannot put credentials in {scheme or 'this'} URL; use redis://...")
    hosts = rest.rpartition("@")[2]
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{hosts}"


def write_files(folder: Path, redis_url: str, nodes: Iterable[str] = ()) -> list[Path]:
    """`folder`/users.acl and one `{user}.url` per user (NEBULA_REDIS_URL for that
    role's processes), readable by their owner only."""
    nodes = [check_name(n, "a node id in --nodes") for n in nodes]
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    text, passwords = acl_file(nodes)
    written = [folder / "users.acl"]
    written[0].write_text(text)
    for user, password in passwords.items():
        path = folder / f"{user}.url"
        path.write_text(with_user(redis_url, user, password) + "\n")
        written.append(path)
    for path in written:
        path.chmod(0o600)
    return written

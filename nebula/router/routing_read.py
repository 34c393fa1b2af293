"""What a router reads from Redis, and how little: a full read once, then a poll
whose cost does not grow with the cluster.

- `read_full`: every endpoint (one HVALS), the loaded and unloading models, the
  API keys, and the sequence numbers they were read at. At start, after an
  outage or a new master, and after a gap in the feed.
- `poll`: the endpoint sequence number, the routing version (bumped by loads,
  unloads and API-key changes) and ROLE, three O(1) commands in one round trip.
- `changes_after`: the endpoint feed from the router's last sequence number,
  only when the poll says something changed.
- `read_config`: the models, unloading models and API keys, only when the
  routing version moved.
"""

from __future__ import annotations

from typing import NamedTuple

from nebula.errors import StateUnavailable
from nebula.models import ApiKey, Endpoint
from nebula.settings import redact
from nebula.store import State, api_keys, endpoints, wire


class Config(NamedTuple):
    version: int
    models: set[str]  # loaded (requested) models
    api_keys: list[ApiKey]
    unloading: set[str]  # models being unloaded


class Full(NamedTuple):
    seq: int
    endpoints: list[Endpoint]
    config: Config


def _number(raw: object) -> int:
    return int(raw) if raw else 0  # type: ignore[call-overload]


def _keys(raw: list[str]) -> list[ApiKey]:
    return wire.readable(api_keys.decode, raw, "API key")


def _check_role(state: State, role: object) -> None:
    # A replica (a master demoted by a failover, or a misconfiguration) still answers
    # reads, but nobody writes there: that is an outage, not a cluster gone quiet.
    if role and role[0] != "master":  # type: ignore[index]
        raise StateUnavailable(
            f"Redis at {redact(state.url)} is a {role[0]} (read-only): no writer can "  # type: ignore[index]
            "refresh the routing state"
        )


async def read_full(state: State) -> Full:
    """Everything, in one round trip. The sequence number is read first: a change
    that lands between it and the index is applied again from the feed, harmlessly."""
    async with state.reachable(), state.redis.pipeline(transaction=False) as pipe:
        state.endpoints.stage_read_seq(pipe)
        state.requests.stage_read_routing_version(pipe)
        state.endpoints.stage_read_all(pipe)
        state.requests.stage_read_routing(pipe)
        state.api_keys.stage_read_all(pipe)
        pipe.execute_command("ROLE")
        seq, version, raw, models, unloading, keys_raw, role = await pipe.execute()
    _check_role(state, role)
    config = Config(_number(version), set(models), _keys(keys_raw), set(unloading))
    return Full(_number(seq), wire.readable(endpoints.decode, raw, "endpoint"), config)


async def poll(state: State) -> tuple[int, int]:
    """(endpoint sequence number, routing version), with the role checked."""
    async with state.reachable(), state.redis.pipeline(transaction=False) as pipe:
        state.endpoints.stage_read_seq(pipe)
        state.requests.stage_read_routing_version(pipe)
        pipe.execute_command("ROLE")
        seq, version, role = await pipe.execute()
    _check_role(state, role)
    return _number(seq), _number(version)


async def read_config(state: State) -> Config:
    async with state.reachable(), state.redis.pipeline(transaction=False) as pipe:
        state.requests.stage_read_routing_version(pipe)
        state.requests.stage_read_routing(pipe)
        state.api_keys.stage_read_all(pipe)
        version, models, unloading, keys_raw = await pipe.execute()
    return Config(_number(version), set(models), _keys(keys_raw), set(unloading))

"""The one module that talks to Redis.

Every read and write of Nebula's state goes through `State`. Writes that must
be atomic use MULTI/EXEC, with WATCH where they depend on what they read;
the scheduler's writes are fenced by its leader key, so a leader that lost its
lease (paused, partitioned) can never write after its successor started.
Redis being unreachable is a `StateUnavailable` error, never a raw traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nebula import keys
from nebula.connection import Connection, parse_sentinel
from nebula.errors import Conflict, InvalidRequest, NotFound, StateUnavailable
from nebula.models import (
    ApiKey,
    Device,
    Endpoint,
    ModelRequest,
    ModelSpec,
    Node,
    Placement,
    PlacementState,
    Status,
)
from nebula.settings import Settings, redact

log = logging.getLogger(__name__)

MAX_REPLICAS = 256

# Renew or release the leader key only while we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# One call for a thousand keys: a pipeline costs the client tens of microseconds
# per command, a script returns everything at once.
_ALIVE = """
local alive = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 1 then alive[#alive + 1] = id end
end
return alive
"""
_HGETALL_EACH = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""

_SET_STATUS = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
if current == 'Unloading' and ARGV[1] ~= 'Unloading' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'message', ARGV[2], 'updated_at', ARGV[3],
           'ever_ready', ARGV[4], 'failures', ARGV[5], 'retry_at', ARGV[6],
           'last_failure', ARGV[7])
return 1
"""


def digest(secret: str) -> str:
    """How keys are stored and compared: never the key itself."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Snapshot:
    """Everything the scheduler reads in one pass."""

    node_ids: set[str] = field(default_factory=set)  # registered, alive or not
    alive: set[str] = field(default_factory=set)  # heartbeat key present
    nodes: dict[str, Node] = field(default_factory=dict)  # last telemetry read, alive only
    requests: dict[str, ModelRequest] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)  # id -> placement
    states: dict[str, PlacementState] = field(default_factory=dict)  # placement id -> state
    marks: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())  # cordoned, draining
    devices_cache: dict[str, tuple[Device, ...]] = field(default_factory=dict)  # raw -> parsed
    state_ids: dict[str, set[str]] = field(default_factory=dict)  # node -> ids in its states
    # What others changed since the previous pass (everything, on a full pass).
    dirty_requests: set[str] = field(default_factory=set)
    dirty_nodes: set[str] = field(default_factory=set)  # nodes whose placement states changed


@dataclass
class Changes:
    """The scheduler's writes for one pass, applied atomically."""

    put_placements: list[Placement] = field(default_factory=list)
    drop_placements: list[Placement] = field(default_factory=list)
    put_requests: list[ModelRequest] = field(default_factory=list)
    gone_requests: list[ModelRequest] = field(default_factory=list)
    events: list[tuple[str, str, Status]] = field(default_factory=list)  # request, text, status
    dead_nodes: list[str] = field(default_factory=list)
    # Not written: what could not be placed this pass (request id -> reasons), for metrics.
    pending: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(
            (
                self.put_placements,
                self.drop_placements,
                self.put_requests,
                self.gone_requests,
                self.events,
                self.dead_nodes,
            )
        )


class State:
    """Nebula's state in Redis."""

    def __init__(self, url: str, *, event_history: int = 100, sentinel_password: str = "") -> None:
        self.url = url
        self.event_history = event_history
        self.connection = Connection(
            url,
            sentinel_password=sentinel_password,
            decode_responses=True,
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            health_check_interval=10,
        )
        self.redis: aioredis.Redis = self.connection.client
        # When the last call failed for want of a writable master (None: it worked).
        self.unavailable_since: float | None = None
        # Bumped on every change of master (Sentinel): writes made just before it may
        # be lost, so loops treat it like the end of an outage (re-announce, grace).
        self.master_epoch = 0
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    @classmethod
    def of(cls, settings: Settings) -> State:
        """The state store `settings` name (a plain Redis or a Sentinel-watched master)."""
        return cls(
            settings.redis_url,
            event_history=settings.event_history,
            sentinel_password=settings.redis_sentinel_password,
        )

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> State:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        try:
            yield
            self.unavailable_since = None
        except MasterNotFoundError:
            self.unavailable_since = self.unavailable_since or time.time()
            sentinels = ", ".join(f"{h}:{p}" for h, p in parse_sentinel(self.url).sentinels)
            raise StateUnavailable(
                f"no Sentinel ({sentinels}) names a master for "
                f"{self.connection.master_name!r}: none answers, or none monitors that name; "
                "check the Sentinels and NEBULA_REDIS_URL"
            ) from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.unavailable_since = self.unavailable_since or time.time()
            raise StateUnavailable(
                f"cannot reach Redis at {redact(self.url)} ({exc}); is it running? "
                "Check NEBULA_REDIS_URL"
            ) from None
        except WatchError:
            raise  # a lost optimistic-lock race: the caller retries or gives up
        except RedisError as exc:
            self.unavailable_since = self.unavailable_since or time.time()
            # READONLY (a replica, or a master demoted by Sentinel), OOM, LOADING, a
            # script or type error: the store cannot do this now. One error for every
            # caller, so no loop dies of a kind of Redis error it did not expect.
            raise StateUnavailable(
                f"Redis at {redact(self.url)} refused the operation "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from None

    async def ping(self) -> None:
        async with self._reachable():
            await self.redis.ping()

    async def notify(self, what: str) -> None:
        """Wake every loop that listens; losing this message costs latency only."""
        async with self._reachable():
            await self.redis.publish(keys.EVENTS_CHANNEL, what)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, channel: str = keys.EVENTS_CHANNEL
    ) -> AsyncIterator[aioredis.client.PubSub]:
        async with self._reachable():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(channel)
        try:
            yield pubsub
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def wake_on(self, event: asyncio.Event, channel: str, retry_s: float) -> None:
        """Set `event` on every message on `channel`, forever; resubscribe after a loss.

        Loops that use it also poll, so while Redis is away they only lose latency.
        """
        while True:
            try:
                async with self.subscribe(channel) as pubsub:
                    async for _ in pubsub.listen():
                        event.set()
            except Exception as exc:  # connection errors of every kind (redis-py's own too)
                log.debug("subscription to %s lost (%s)", channel, exc)
            await asyncio.sleep(retry_s)

    # ----------------------------------------------------------- model requests

    async def create_request(self, spec: ModelSpec, replicas: int) -> ModelRequest:
        """Ask for `replicas` engines of `spec`; a model is loaded at most once."""
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise InvalidRequest(f"replicas must be a whole number, not {replicas!r}")
        if not 1 <= replicas <= MAX_REPLICAS:
            raise InvalidRequest(f"replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")
        now = time.time()
        request = ModelRequest(
            id=f"{spec.name}-{uuid.uuid4().hex[:6]}",
            spec=spec,
            replicas=replicas,
            status=Status.PENDING,
            message="waiting for the scheduler",
            created_at=now,
            updated_at=now,
        )
        async with self._reachable(), self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(keys.MODELS)
                    existing = await pipe.hget(keys.MODELS, spec.name)
                    if existing:
                        raise Conflict(
                            f"model {spec.name!r} is already loaded as request {existing}; "
                            "unload it first, or change its replicas"
                        )
                    pipe.multi()
                    pipe.hset(keys.MODELS, spec.name, request.id)
                    pipe.hset(keys.request(request.id), mapping=request.to_hash())
                    pipe.sadd(keys.REQUESTS, request.id)
                    pipe.sadd(keys.REQUESTS_DIRTY, request.id)
                    self._event(
                        pipe, request.id, f"load asked: {replicas} replica(s)", request.status
                    )
                    pipe.publish(keys.EVENTS_CHANNEL, "request")
                    await pipe.execute()
                    return request
                except WatchError:
                    continue

    async def delete_request(self, ref: str, drain_timeout_s: float | None = None) -> ModelRequest:
        """Unload: mark the request `Unloading`; its engines are drained (for at most
        `drain_timeout_s`, when given) and stopped, then it is gone."""
        async with self._reachable(), self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    request_id = await self._resolve(ref, self.redis)
                    await pipe.watch(keys.request(request_id))
                    raw = await pipe.hgetall(keys.request(request_id))
                    if not raw:
                        raise NotFound(f"no model request {ref!r}")
                    request = ModelRequest.from_hash(raw)
                    if request.status is Status.UNLOADING:
                        return request
                    now = time.time()
                    fields = {
                        "status": Status.UNLOADING.value,
                        "message": "unload asked: draining and stopping replicas",
                        "updated_at": repr(now),
                        "drain_timeout_s": ""
                        if drain_timeout_s is None
                        else repr(float(drain_timeout_s)),
                    }
                    pipe.multi()
                    pipe.hset(keys.request(request_id), mapping=fields)
                    pipe.sadd(keys.REQUESTS_DIRTY, request_id)
                    pipe.sadd(keys.UNLOADING, request.model)
                    drain = (
                        "" if drain_timeout_s is None else f" (drain at most {drain_timeout_s:g}s)"
                    )
                    self._event(pipe, request_id, "unload asked" + drain, Status.UNLOADING)
                    pipe.publish(keys.EVENTS_CHANNEL, "request")
                    await pipe.execute()
                    return ModelRequest.from_hash({**raw, **fields})
                except WatchError:
                    continue

    async def _resolve(self, ref: str, client: Any) -> str:
        """A request id from an id or a served model name."""
        if not ref:
            raise InvalidRequest("name a model or a request id")
        if await client.sismember(keys.REQUESTS, ref):
            return ref
        request_id = await client.hget(keys.MODELS, ref)
        if request_id:
            return str(request_id)
        loaded = await client.hkeys(keys.MODELS)
        known = ", ".join(sorted(loaded)) or "none"
        raise NotFound(f"no model request {ref!r}; loaded models: {known}")

    async def get_request(self, ref: str) -> ModelRequest:
        async with self._reachable():
            request_id = await self._resolve(ref, self.redis)
            raw = await self.redis.hgetall(keys.request(request_id))
        if not raw:
            raise NotFound(f"no model request {ref!r}")
        return ModelRequest.from_hash(raw)

    async def list_requests(self) -> list[ModelRequest]:
        async with self._reachable():
            ids = sorted(await self.redis.smembers(keys.REQUESTS))
            return sorted(
                (r for r in await self._read_requests(ids) if r is not None),
                key=lambda r: (r.created_at, r.id),
            )

    async def _read_requests(self, ids: Sequence[str]) -> list[ModelRequest | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hgetall(keys.request(request_id))
            rows = await pipe.execute()
        return [ModelRequest.from_hash(row) if row else None for row in rows]

    async def events(self, request_id: str, count: int | None = None) -> list[dict[str, Any]]:
        """The request's event history, oldest first."""
        async with self._reachable():
            entries = await self.redis.xrange(keys.request_events(request_id))
        out = [
            {"at": float(fields["at"]), "status": fields["status"], "message": fields["message"]}
            for _, fields in entries
        ]
        return out[-count:] if count else out

    def _event(self, pipe: Any, request_id: str, text: str, status: Status) -> None:
        pipe.xadd(
            keys.request_events(request_id),
            {"at": repr(time.time()), "status": status.value, "message": text},
            maxlen=self.event_history,
            approximate=False,
        )

    # -------------------------------------------------------------------- nodes

    async def heartbeat(self, node: Node, ttl_s: float) -> None:
        """Publish the node's heartbeat; it dies with its TTL unless renewed."""
        async with self._reachable(), self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(keys.NODES, node.id)
            pipe.delete(keys.node(node.id))
            pipe.hset(keys.node(node.id), mapping=node.to_hash())
            pipe.pexpire(keys.node(node.id), int(ttl_s * 1000))
            await pipe.execute()

    async def list_nodes(self) -> list[Node]:
        """Live nodes, with the operator's cordon and drain marks."""
        async with self._reachable():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.smembers(keys.NODES)
                pipe.smembers(keys.CORDONED)
                pipe.smembers(keys.DRAINING)
                node_ids, cordoned, draining = await pipe.execute()
            ids = sorted(node_ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for node_id in ids:
                    pipe.hgetall(keys.node(node_id))
                rows = await pipe.execute()
        return [
            Node.from_hash(row, cordoned=row["id"] in cordoned, draining=row["id"] in draining)
            for row in rows
            if row
        ]

    async def set_cordon(self, node_id: str, *, cordoned: bool, drain: bool = False) -> None:
        """Cordon (no new placements), drain (also move placements off), or undo both."""
        async with self._reachable():
            if not await self.redis.sismember(keys.NODES, node_id):
                nodes = ", ".join(sorted(await self.redis.smembers(keys.NODES))) or "none"
                raise NotFound(f"no node {node_id!r}; known nodes: {nodes}")
            async with self.redis.pipeline(transaction=True) as pipe:
                if cordoned:
                    pipe.sadd(keys.CORDONED, node_id)
                    if drain:
                        pipe.sadd(keys.DRAINING, node_id)
                else:
                    pipe.srem(keys.CORDONED, node_id)
                    pipe.srem(keys.DRAINING, node_id)
                pipe.publish(keys.EVENTS_CHANNEL, "node")
                await pipe.execute()

    # --------------------------------------------------------------- placements

    async def node_placements(self, node_id: str) -> list[Placement]:
        async with self._reachable():
            raw = await self.redis.hgetall(keys.placements(node_id))
        return [Placement.from_json(value) for value in raw.values()]

    async def set_placement_states(
        self, node_id: str, states: dict[str, PlacementState], *, drop: Iterable[str] = ()
    ) -> None:
        """The node agent's report of its engines."""
        async with self._reachable(), self.redis.pipeline(transaction=True) as pipe:
            if states:
                pipe.hset(
                    keys.placement_state(node_id),
                    mapping={pid: s.to_json() for pid, s in states.items()},
                )
            dropped = list(drop)
            if dropped:
                pipe.hdel(keys.placement_state(node_id), *dropped)
            pipe.sadd(keys.PLACEMENT_STATE_DIRTY, node_id)
            pipe.publish(keys.EVENTS_CHANNEL, "placement-state")
            await pipe.execute()

    async def all_placements(self) -> list[tuple[Placement, PlacementState | None]]:
        """Every placement with its observed state (admin views; not for hot paths)."""
        async with self._reachable():
            node_ids = sorted(await self.redis.smembers(keys.NODES))
            async with self.redis.pipeline(transaction=False) as pipe:
                for node_id in node_ids:
                    pipe.hgetall(keys.placements(node_id))
                    pipe.hgetall(keys.placement_state(node_id))
                rows = await pipe.execute()
        out: list[tuple[Placement, PlacementState | None]] = []
        for placements, states in zip(rows[::2], rows[1::2], strict=True):
            for pid, raw in sorted(placements.items()):
                state = states.get(pid)
                out.append(
                    (Placement.from_json(raw), PlacementState.from_json(state) if state else None)
                )
        return out

    async def placement_states(self, node_id: str) -> dict[str, PlacementState]:
        async with self._reachable():
            raw = await self.redis.hgetall(keys.placement_state(node_id))
        return {pid: PlacementState.from_json(value) for pid, value in raw.items()}

    # ---------------------------------------------------------------- endpoints

    async def publish_endpoint(self, endpoint: Endpoint, ttl_s: float, *, announce: bool) -> None:
        """Publish (or refresh) a healthy engine; it lapses with its TTL unless refreshed.

        `announce` wakes the routers at once (a new endpoint); plain refreshes don't.
        """
        ttl_ms = int(ttl_s * 1000)
        expires = int(time.time() * 1000) + ttl_ms
        async with self._reachable(), self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.endpoint(endpoint.placement_id), endpoint.to_json(), px=ttl_ms)
            pipe.zadd(keys.ENDPOINTS, {endpoint.placement_id: expires})
            pipe.zremrangebyscore(keys.ENDPOINTS, "-inf", int(time.time() * 1000))
            if announce:
                pipe.publish(keys.EVENTS_CHANNEL, "endpoints")
            await pipe.execute()

    async def withdraw_endpoint(self, placement_id: str) -> None:
        async with self._reachable(), self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.endpoint(placement_id))
            pipe.zrem(keys.ENDPOINTS, placement_id)
            pipe.publish(keys.EVENTS_CHANNEL, "endpoints")
            await pipe.execute()

    async def routing(self) -> tuple[list[Endpoint], set[str], list[ApiKey], set[str]]:
        """What a router needs, in two round trips: live endpoints, loaded models, API keys,
        models being unloaded."""
        now_ms = int(time.time() * 1000)
        async with self._reachable():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrangebyscore(keys.ENDPOINTS, now_ms, "+inf")
                pipe.hkeys(keys.MODELS)
                pipe.hvals(keys.API_KEYS)
                pipe.smembers(keys.UNLOADING)
                # A replica (a master demoted by a failover, or a misconfiguration)
                # still answers reads, but nobody can refresh what it holds: its
                # endpoints lapse one by one. That is an outage, not a dying cluster.
                pipe.execute_command("ROLE")
                ids, models, api_keys, unloading, role = await pipe.execute()
            if role and role[0] != "master":
                raise StateUnavailable(
                    f"Redis at {redact(self.url)} is a {role[0]} (read-only): no writer can "
                    "refresh the routing state"
                )
            raw = await self.redis.mget([keys.endpoint(i) for i in ids]) if ids else []
        endpoints = [Endpoint.from_json(r) for r in raw if r]
        api = [ApiKey.from_json(k) for k in api_keys]
        return endpoints, set(models), api, set(unloading)

    # ------------------------------------------------------------ metrics targets

    async def register_metrics(self, kind: str, ident: str, address: str, ttl_s: float) -> None:
        """Advertise a process's /metrics (HOST:PORT) for `ttl_s`; refresh before it lapses."""
        entry = {"kind": kind, "id": ident, "address": address, "expires_at": time.time() + ttl_s}
        async with self._reachable():
            await self.redis.hset(keys.METRICS_TARGETS, f"{kind}:{ident}", json.dumps(entry))

    async def metrics_targets(self) -> list[dict[str, Any]]:
        """Live processes' /metrics addresses; lapsed entries are removed."""
        now = time.time()
        async with self._reachable():
            raw = await self.redis.hgetall(keys.METRICS_TARGETS)
            entries = {field: json.loads(value) for field, value in raw.items()}
            dead = [field for field, e in entries.items() if e["expires_at"] < now]
            if dead:
                await self.redis.hdel(keys.METRICS_TARGETS, *dead)
        return sorted(
            (e for e in entries.values() if e["expires_at"] >= now),
            key=lambda e: (e["kind"], e["id"]),
        )

    # ----------------------------------------------------------------- API keys

    async def create_api_key(self, name: str, rate_per_s: float | None = None) -> str:
        """Store a new key's hash under `name`; the key itself is returned once, never stored."""
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
            raise InvalidRequest("a key name is 1-64 letters, digits, '-' or '_'")
        if rate_per_s is not None and not rate_per_s > 0:
            raise InvalidRequest(f"rate_per_s must be above 0, not {rate_per_s}")
        secret = "sk-nebula-" + secrets.token_urlsafe(24)
        key = ApiKey(
            name=name, digest=digest(secret), rate_per_s=rate_per_s, created_at=time.time()
        )
        async with self._reachable():
            if not await self.redis.hsetnx(keys.API_KEYS, name, key.to_json()):
                raise Conflict(f"an API key named {name!r} exists; delete it first")
            await self.redis.publish(keys.EVENTS_CHANNEL, "api-keys")
        return secret

    async def list_api_keys(self) -> list[ApiKey]:
        async with self._reachable():
            raw = await self.redis.hvals(keys.API_KEYS)
        return sorted((ApiKey.from_json(r) for r in raw), key=lambda k: k.name)

    async def delete_api_key(self, name: str) -> None:
        async with self._reachable():
            if not await self.redis.hdel(keys.API_KEYS, name):
                raise NotFound(f"no API key named {name!r}")
            await self.redis.publish(keys.EVENTS_CHANNEL, "api-keys")

    # --------------------------------------------------------------- scheduler

    async def acquire_or_renew(self, me: str, ttl_s: float, *, held: bool) -> bool:
        """Hold the scheduler lease: renew it if held, else try to take it."""
        ttl_ms = int(ttl_s * 1000)
        async with self._reachable():
            if held and await self._renew(keys=[keys.SCHEDULER_LEADER], args=[me, ttl_ms]):
                return True
            return bool(await self.redis.set(keys.SCHEDULER_LEADER, me, nx=True, px=ttl_ms))

    async def release(self, me: str) -> None:
        async with self._reachable():
            await self._release(keys=[keys.SCHEDULER_LEADER], args=[me])

    async def leader(self) -> str | None:
        async with self._reachable():
            value = await self.redis.get(keys.SCHEDULER_LEADER)
        return str(value) if value else None

    async def read_cluster(self, snapshot: Snapshot, *, full: bool) -> Snapshot:
        """Refresh `snapshot` in a fixed number of round trips, whatever the cluster's size.

        Every pass reads node liveness and marks. A full pass reads every request,
        placement and placement state. Otherwise only what others changed since
        the last pass is read: requests marked dirty by load and unload, and the
        placement states of nodes whose agents marked them dirty. Placements are
        the leader's own writes, so its copy stays current between full passes.
        Node telemetry is read separately, by `read_telemetry`, only when needed.
        """
        async with self._reachable():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.smembers(keys.NODES)
                pipe.smembers(keys.CORDONED)
                pipe.smembers(keys.DRAINING)
                pipe.smembers(keys.REQUESTS if full else keys.REQUESTS_DIRTY)
                pipe.smembers(keys.NODES if full else keys.PLACEMENT_STATE_DIRTY)
                pipe.delete(keys.REQUESTS_DIRTY, keys.PLACEMENT_STATE_DIRTY)
                pipe.eval(_ALIVE, 1, keys.NODES, keys.node(""))
                (
                    node_ids,
                    cordoned,
                    draining,
                    request_ids,
                    state_nodes,
                    _,
                    alive,
                ) = await pipe.execute()
            ids = sorted(node_ids)
            request_ids = sorted(request_ids)
            state_nodes = sorted(state_nodes)
            async with self.redis.pipeline(transaction=False) as pipe:
                for node_id in state_nodes:
                    pipe.hgetall(keys.placement_state(node_id))
                if full:
                    for node_id in ids:
                        pipe.hgetall(keys.placements(node_id))
                for request_id in request_ids:
                    pipe.hgetall(keys.request(request_id))
                rows = iter(await pipe.execute() if len(pipe) else [])
        snapshot.node_ids = set(ids)
        snapshot.alive = set(alive)
        marks = (frozenset(cordoned), frozenset(draining))
        snapshot.nodes = {
            n: node
            if marks == snapshot.marks
            else replace(node, cordoned=n in cordoned or n in draining, draining=n in draining)
            for n, node in snapshot.nodes.items()
            if n in snapshot.alive
        }
        snapshot.marks = marks
        snapshot.dirty_nodes = set(state_nodes)
        if full:
            snapshot.states = {}
            snapshot.state_ids = {}
        for node_id in state_nodes:
            fresh = {pid: PlacementState.from_json(raw) for pid, raw in next(rows).items()}
            for pid in snapshot.state_ids.get(node_id, set()) - fresh.keys():
                snapshot.states.pop(pid, None)
            snapshot.state_ids[node_id] = set(fresh)
            snapshot.states.update(fresh)
        if full:
            snapshot.placements = {}
            for _ in ids:
                for raw in next(rows).values():
                    p = Placement.from_json(raw)
                    snapshot.placements[p.id] = p
            snapshot.requests = {}
        snapshot.dirty_requests = set(request_ids)
        for request_id in request_ids:
            row = next(rows)
            if row:
                snapshot.requests[request_id] = ModelRequest.from_hash(row)
            else:
                snapshot.requests.pop(request_id, None)
        return snapshot

    async def snapshot(self) -> Snapshot:
        """Everything, read afresh: a full pass's input."""
        snap = await self.read_cluster(Snapshot(), full=True)
        await self.read_telemetry(snap, snap.alive)
        return snap

    async def read_telemetry(self, snapshot: Snapshot, node_ids: Iterable[str]) -> None:
        """Read the heartbeats (telemetry) of `node_ids` into `snapshot.nodes`, in one call."""
        ids = sorted(node_ids)
        if not ids:
            return
        cordoned, draining = snapshot.marks
        async with self._reachable():
            rows = await self.redis.eval(_HGETALL_EACH, len(ids), *(keys.node(n) for n in ids))
        for node_id, flat in zip(ids, rows, strict=True):
            if not flat:
                snapshot.nodes.pop(node_id, None)
                continue
            row = dict(zip(flat[::2], flat[1::2], strict=True))
            node = Node.from_hash(
                row,
                cordoned=node_id in cordoned,
                draining=node_id in draining,
                devices=snapshot.devices_cache.get(row.get("devices", "")),
            )
            snapshot.devices_cache[row.get("devices", "")] = node.devices
            snapshot.nodes[node_id] = node
        if len(snapshot.devices_cache) > 4 * len(snapshot.alive) + 64:
            snapshot.devices_cache.clear()  # bounded: telemetry strings mostly change

    async def apply(self, changes: Changes, *, leader: str) -> bool:
        """Write one pass's changes atomically, only while `leader` holds the lease.

        Returns False, writing nothing, when the lease is someone else's.
        """
        async with self._reachable(), self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(keys.SCHEDULER_LEADER)
                if await pipe.get(keys.SCHEDULER_LEADER) != leader:
                    return False
                pipe.multi()
                for p in changes.put_placements:
                    pipe.hset(keys.placements(p.node), p.id, p.to_json())
                for p in changes.drop_placements:
                    pipe.hdel(keys.placements(p.node), p.id)
                    pipe.hdel(keys.placement_state(p.node), p.id)
                for node_id in changes.dead_nodes:
                    pipe.delete(keys.placements(node_id), keys.placement_state(node_id))
                    pipe.srem(keys.NODES, node_id)
                    pipe.srem(keys.CORDONED, node_id)
                    pipe.srem(keys.DRAINING, node_id)
                for request in changes.put_requests:
                    # Only the fields the scheduler owns, and never over an unload
                    # that landed after this pass read the request.
                    fields = request.to_hash()
                    # EVAL, not EVALSHA: inside MULTI a NOSCRIPT (Redis restarted)
                    # would fail the whole transaction.
                    pipe.eval(
                        _SET_STATUS,
                        1,
                        keys.request(request.id),
                        fields["status"],
                        fields["message"],
                        fields["updated_at"],
                        fields["ever_ready"],
                        fields["failures"],
                        fields["retry_at"],
                        fields["last_failure"],
                    )
                for request_id, text, status in changes.events:
                    self._event(pipe, request_id, text, status)
                for request in changes.gone_requests:
                    pipe.delete(keys.request(request.id), keys.request_events(request.id))
                    pipe.srem(keys.REQUESTS, request.id)
                    pipe.srem(keys.REQUESTS_DIRTY, request.id)
                    # Safe: a model name maps to its request until that request is gone.
                    pipe.hdel(keys.MODELS, request.model)
                    pipe.srem(keys.UNLOADING, request.model)
                pipe.publish(keys.EVENTS_CHANNEL, "placements")
                touched = {p.node for p in changes.put_placements}
                touched.update(p.node for p in changes.drop_placements)
                for node_id in sorted(touched):
                    pipe.publish(keys.node_channel(node_id), "placements")
                await pipe.execute()
            except WatchError:
                return False
        return True

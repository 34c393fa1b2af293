"""Model requests: the desired state operators (and on-demand loads) write.

Keys: `nebula:requests` (ids), `nebula:models` (served name -> id, one request
per model), `nebula:request:{id}` (hash), `nebula:request-events:{id}` (capped
stream), `nebula:requests:dirty` (ids others changed since the scheduler's
last pass) and `nebula:unloading` (models being unloaded, for the routers).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from nebula import redis_keys
from nebula.durations import show_duration
from nebula.errors import Conflict, InvalidRequest, NotFound
from nebula.models import ModelRequest, ModelSpec, Status
from nebula.replicas import MAX_REPLICAS
from nebula.store import wire
from nebula.store.core import Core
from nebula.store.request_format import decode, encode, seconds
from nebula.store.request_format import readable as _readable

# The scheduler writes only the fields it owns, and never over an unload that
# landed after its pass read the request.
_SET_STATUS = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
if current == 'Unloading' and ARGV[1] ~= 'Unloading' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'message', ARGV[2], 'updated_at', ARGV[3],
           'ever_ready', ARGV[4], 'failures', ARGV[5], 'retry_at', ARGV[6],
           'last_failure', ARGV[7], 'ready_at', ARGV[8])
return 1
"""

# Autoscaling's write: only while the request is served (an unload asked since the
# pass read it wins).
_SET_REPLICAS = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current or current == 'Unloading' then return 0 end
redis.call('HSET', KEYS[1], 'replicas', ARGV[1])
return 1
"""


def _check_replicas(replicas: object, max_replicas: object) -> None:
    """A count of replicas (and the top of its range, when given) an operator may ask."""
    for name, value in (("replicas", replicas), ("max_replicas", max_replicas)):
        if value is None and name == "max_replicas":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequest(f"{name} must be a whole number, not {value!r}")
        if not 1 <= value <= MAX_REPLICAS:
            raise InvalidRequest(f"{name} must be between 1 and {MAX_REPLICAS}, not {value}")
    if isinstance(max_replicas, int) and isinstance(replicas, int) and max_replicas < replicas:
        raise InvalidRequest(
            f"max_replicas ({max_replicas}) is below replicas ({replicas}); give a range "
            "as MIN..MAX with MIN <= MAX"
        )


class Requests:
    def __init__(self, core: Core, event_history: int = 100) -> None:
        self.core = core
        self.event_history = event_history

    async def create(
        self,
        spec: ModelSpec,
        replicas: int,
        *,
        keep_alive_s: float | None = None,
        on_demand: bool = False,
        max_replicas: int | None = None,
    ) -> ModelRequest:
        """Ask for `replicas` engines of `spec`; a model is loaded at most once.

        `keep_alive_s`: unload after this long without requests (None: pinned).
        `on_demand`: asked for by a client's request rather than by an operator.
        `max_replicas`: the scheduler adds replicas up to this many while the load
        calls for them, and drains them down to `replicas` when it no longer does.
        """
        _check_replicas(replicas, max_replicas)
        now = time.time()
        request = ModelRequest(
            id=f"{spec.name}-{uuid.uuid4().hex[:6]}",
            spec=spec,
            replicas=replicas,
            status=Status.PENDING,
            message="waiting for the scheduler",
            created_at=now,
            updated_at=now,
            on_demand=on_demand,
            keep_alive_s=keep_alive_s,
            min_replicas=replicas,
            max_replicas=max_replicas or replicas,
        )
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(redis_keys.MODELS)
                    existing = str(await pipe.hget(redis_keys.MODELS, spec.name) or "")
                    if existing:
                        raise Conflict(
                            f"model {spec.name!r} is already loaded as request {existing}; "
                            "unload it first, or change its replicas"
                        )
                    pipe.multi()
                    self._stage_create(pipe, request)
                    await pipe.execute()
                    return request
                except WatchError:
                    continue

    def _stage_create(self, pipe: Pipeline, request: ModelRequest) -> None:
        pipe.hset(redis_keys.MODELS, request.model, request.id)
        pipe.incr(redis_keys.ROUTING_VERSION)
        pipe.hset(redis_keys.request(request.id), mapping=wire.for_hset(encode(request)))
        pipe.sadd(redis_keys.REQUESTS, request.id)
        pipe.sadd(redis_keys.REQUESTS_DIRTY, request.id)
        how = "on demand (a client's request)" if request.on_demand else "load asked"
        text = f"{how}: {request.replicas} replica(s)"
        if request.autoscaled:
            top = f"{request.min_replicas}..{request.max_replicas}"
            text = f"{how}: {top} replicas, following the load"
        if request.on_demand or request.keep_alive_s is not None:
            text += f", keep-alive {show_duration(request.keep_alive_s)}"
        self.stage_event(pipe, request.id, text, request.status)
        pipe.publish(redis_keys.EVENTS_CHANNEL, "request")

    async def unload(self, ref: str, drain_timeout_s: float | None = None) -> ModelRequest:
        """Unload: mark the request `Unloading`; its engines are drained (for at most
        `drain_timeout_s`, when given) and stopped, then it is gone."""
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    request_id, raw = await self._watch(pipe, ref)
                    request = _readable(raw, ref)
                    if request.status is Status.UNLOADING:
                        return request
                    fields = {
                        "status": Status.UNLOADING.value,
                        "message": "unload asked: draining and stopping replicas",
                        "updated_at": repr(time.time()),
                        "drain_timeout_s": ""
                        if drain_timeout_s is None
                        else repr(float(drain_timeout_s)),
                    }
                    pipe.multi()
                    pipe.hset(redis_keys.request(request_id), mapping=wire.for_hset(fields))
                    pipe.sadd(redis_keys.REQUESTS_DIRTY, request_id)
                    pipe.sadd(redis_keys.UNLOADING, request.model)
                    pipe.incr(redis_keys.ROUTING_VERSION)
                    drain = (
                        "" if drain_timeout_s is None else f" (drain at most {drain_timeout_s:g}s)"
                    )
                    self.stage_event(pipe, request_id, "unload asked" + drain, Status.UNLOADING)
                    pipe.publish(redis_keys.EVENTS_CHANNEL, "request")
                    await pipe.execute()
                    return decode({**raw, **fields})
                except WatchError:
                    continue

    async def set_keep_alive(self, ref: str, keep_alive_s: float | None) -> ModelRequest:
        """Pin (None) or unpin (a keep-alive) a loaded model."""
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    request_id, raw = await self._watch(pipe, ref)
                    request = _readable(raw, ref)
                    if request.status is Status.UNLOADING:
                        raise Conflict(f"model {request.model!r} is being unloaded")
                    value = seconds(keep_alive_s)
                    pipe.multi()
                    pipe.hset(redis_keys.request(request_id), "keep_alive_s", value)
                    pipe.sadd(redis_keys.REQUESTS_DIRTY, request_id)
                    text = (
                        "pinned: never unloaded when idle"
                        if keep_alive_s is None
                        else (f"keep-alive set to {show_duration(keep_alive_s)}")
                    )
                    self.stage_event(pipe, request_id, text, request.status)
                    pipe.publish(redis_keys.EVENTS_CHANNEL, "request")
                    await pipe.execute()
                    return decode({**raw, "keep_alive_s": value})
                except WatchError:
                    continue

    async def mark_used(self, last_used: dict[str, float]) -> None:
        """Record when models were last used (a router's batch); never moves one back."""
        if last_used:
            async with self.core.reachable():
                await self.core.redis.zadd(redis_keys.LAST_USED, last_used, gt=True)

    async def last_used(self) -> dict[str, float]:
        async with self.core.reachable():
            read = await self.core.redis.zrange(redis_keys.LAST_USED, 0, -1, withscores=True)
        return dict(cast(list[tuple[str, float]], read))

    async def _watch(self, pipe: Pipeline, ref: str) -> tuple[str, dict[str, str]]:
        """Resolve `ref` and WATCH its request (before MULTI): its id and fields."""
        request_id = await self._resolve(ref)
        await pipe.watch(redis_keys.request(request_id))
        raw = wire.text_hash(await pipe.hgetall(redis_keys.request(request_id)))
        if not raw:
            raise NotFound(f"no model request {ref!r}")
        return request_id, raw

    async def _resolve(self, ref: str) -> str:
        """A request id from an id or a served model name."""
        if not ref:
            raise InvalidRequest("name a model or a request id")
        redis = self.core.redis
        if await redis.sismember(redis_keys.REQUESTS, ref):
            return ref
        request_id = await redis.hget(redis_keys.MODELS, ref)
        if request_id:
            return str(request_id)
        loaded = wire.texts(await redis.hkeys(redis_keys.MODELS))
        known = ", ".join(sorted(loaded)) or "none"
        raise NotFound(f"no model request {ref!r}; loaded models: {known}")

    async def get(self, ref: str) -> ModelRequest:
        async with self.core.reachable():
            request_id = await self._resolve(ref)
            raw = wire.text_hash(await self.core.redis.hgetall(redis_keys.request(request_id)))
        if not raw:
            raise NotFound(f"no model request {ref!r}")
        return _readable(raw, ref)

    async def all(self) -> list[ModelRequest]:
        async with self.core.reachable():
            ids = sorted(wire.texts(await self.core.redis.smembers(redis_keys.REQUESTS)))
            async with self.core.redis.pipeline(transaction=False) as pipe:
                for request_id in ids:
                    pipe.hgetall(redis_keys.request(request_id))
                rows = await pipe.execute()
        readable = wire.readable(decode, (r for r in rows if r), "model request")
        return sorted(readable, key=lambda r: (r.created_at, r.id))

    async def events(self, request_id: str, count: int | None = None) -> list[dict[str, Any]]:
        """The request's event history, oldest first."""
        async with self.core.reachable():
            read = await self.core.redis.xrange(redis_keys.request_events(request_id))
        entries = cast(list[tuple[str, dict[str, str]]], read)
        out = [
            {"at": float(fields["at"]), "status": fields["status"], "message": fields["message"]}
            for _, fields in entries
        ]
        return out[-count:] if count else out

    # Staged onto a caller's pipeline, so that writes across aggregates go out as
    # one MULTI/EXEC (the scheduler's pass, for one).

    def stage_event(self, pipe: Pipeline, request_id: str, text: str, status: Status) -> None:
        pipe.xadd(
            redis_keys.request_events(request_id),
            {"at": repr(time.time()), "status": status.value, "message": text},
            maxlen=self.event_history,
            approximate=False,
        )

    @staticmethod
    def stage_read_ids(pipe: Pipeline, *, dirty_only: bool) -> None:
        """Every request id, or only those others changed since the last read."""
        pipe.smembers(redis_keys.REQUESTS_DIRTY if dirty_only else redis_keys.REQUESTS)

    @staticmethod
    def stage_clear_dirty(pipe: Pipeline) -> None:
        pipe.delete(redis_keys.REQUESTS_DIRTY)

    @staticmethod
    def stage_read(pipe: Pipeline, ids: Sequence[str]) -> None:
        for request_id in ids:
            pipe.hgetall(redis_keys.request(request_id))

    @staticmethod
    def stage_status(pipe: Pipeline, request: ModelRequest) -> None:
        """The scheduler's fields of `request` (status, message, failures...)."""
        fields = encode(request)
        # EVAL, not EVALSHA: inside MULTI a NOSCRIPT (Redis restarted) would fail
        # the whole transaction.
        pipe.eval(
            _SET_STATUS,
            1,
            redis_keys.request(request.id),
            *(
                fields[f]
                for f in (
                    "status",
                    "message",
                    "updated_at",
                    "ever_ready",
                    "failures",
                    "retry_at",
                    "last_failure",
                    "ready_at",
                )
            ),
        )
        if request.status is Status.UNLOADING:  # an idle unload, an eviction
            pipe.sadd(redis_keys.UNLOADING, request.model)
            pipe.incr(redis_keys.ROUTING_VERSION)

    @staticmethod
    def stage_replicas(pipe: Pipeline, request: ModelRequest) -> None:
        """Autoscaling's new replica count (never onto a request being unloaded)."""
        pipe.eval(_SET_REPLICAS, 1, redis_keys.request(request.id), str(request.replicas))
        pipe.sadd(redis_keys.REQUESTS_DIRTY, request.id)

    @staticmethod
    def stage_gone(pipe: Pipeline, request: ModelRequest) -> None:
        pipe.delete(redis_keys.request(request.id), redis_keys.request_events(request.id))
        pipe.srem(redis_keys.REQUESTS, request.id)
        pipe.srem(redis_keys.REQUESTS_DIRTY, request.id)
        # Safe: a model name maps to its request until that request is gone.
        pipe.hdel(redis_keys.MODELS, request.model)
        pipe.srem(redis_keys.UNLOADING, request.model)
        pipe.zrem(redis_keys.LAST_USED, request.model)
        pipe.incr(redis_keys.ROUTING_VERSION)

    @staticmethod
    def stage_read_last_used(pipe: Pipeline) -> None:
        pipe.zrange(redis_keys.LAST_USED, 0, -1, withscores=True)

    @staticmethod
    def stage_read_routing_version(pipe: Pipeline) -> None:
        pipe.get(redis_keys.ROUTING_VERSION)

    @staticmethod
    def stage_read_routing(pipe: Pipeline) -> None:
        """For the routers: the loaded models, then the models being unloaded."""
        pipe.hkeys(redis_keys.MODELS)
        pipe.smembers(redis_keys.UNLOADING)

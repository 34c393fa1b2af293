"""The OpenAI-compatible gateway: /v1 requests proxied to a healthy replica.

The hot path: check the key, read the body once, parse it once to find
`model`, choose a replica, send the same bytes on, and pass the answer back
as it arrives (SSE chunks are written as they come, never buffered). This
module is the client's side (who asks, for what, held while the model loads);
`forward` is the replicas' side (choosing, sending, retrying).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from nebula.models import ApiKey, Endpoint, ModelSpec, Task
from nebula.names import shown
from nebula.router import json_body, router_metrics
from nebula.router.accounting import Account, BudgetExhausted, Ledger
from nebula.router.auth import KeyRing, bearer
from nebula.router.balance import Policy
from nebula.router.flow import FlowControl
from nebula.router.forward import NO_REPLICA_RETRY_AFTER, Forwarder
from nebula.router.ondemand import OnDemand, Refused, UsageRecorder, into_stream
from nebula.router.openai_errors import error, invalid_api_key
from nebula.router.prompt_keys import Prompt
from nebula.router.ratelimit import ClusterLimiter
from nebula.router.table import RoutingTable
from nebula.router.usage_tap import ask_for_usage
from nebula.settings import Settings
from nebula.tenancy import allows

log = logging.getLogger(__name__)

# The engine routes the router forwards, each with the task its model must have
# (None: any). Nothing else reaches an engine: the upstream path is always one of
# these strings, never the client's path.
FORWARDED: dict[str, Task | None] = {
    "/v1/chat/completions": Task.CHAT,
    "/v1/completions": Task.CHAT,
    "/v1/embeddings": Task.EMBEDDING,
    # vLLM's routes that also carry a `model` in their body.
    "/tokenize": None,
    "/detokenize": None,
    "/pooling": None,
    "/classify": None,
    "/score": None,
    "/v1/score": None,
    "/rerank": None,
    "/v1/rerank": None,
    "/v2/rerank": None,
}
TASK_ROUTES = {
    Task.CHAT: "/v1/chat/completions or /v1/completions",
    Task.EMBEDDING: "/v1/embeddings",
}
# Metric labels for requests refused before their key was checked, and for those
# of a model nobody loaded: one series each, whatever the client sent.
UNAUTHENTICATED = "unauthenticated"
OTHER = "other"

# nginx's status for a request whose client closed the connection before its answer.
CLIENT_CLOSED = 499


class Proxy:
    def __init__(
        self,
        settings: Settings,
        table: RoutingTable,
        keys: KeyRing,
        policy: Policy | None = None,
        *,
        engine_key: Callable[[], str] = lambda: "",
        ondemand: OnDemand | None = None,
        usage: UsageRecorder | None = None,
        ledger: Ledger,
    ) -> None:
        self.settings = settings
        self.table = table
        self.keys = keys
        self.ondemand = ondemand
        self.usage = usage
        self.ledger = ledger
        ca = settings.redis_tls_ca_file
        self.limiter = ClusterLimiter(
            settings.redis_url, settings.redis_sentinel_password, str(ca) if ca else None
        )
        self.forwarder = Forwarder(settings, table, policy, engine_key=engine_key)
        self.flow = (
            FlowControl(
                table,
                default_target=settings.max_concurrency,
                queue_limit=settings.queue_limit,
                queue_timeout_s=settings.queue_timeout_s,
                keepalive_s=settings.hold_keepalive_s,
                reserve=settings.priority_reserve,
                reserve_s=settings.priority_reserve_s,
            )
            if settings.flow_control
            else None
        )
        self.inflight = self.forwarder.inflight  # placement id -> requests in flight
        self.streams = self.forwarder.streams
        self.labels = self.forwarder.labels

    async def stop(self) -> None:
        await self.forwarder.stop()
        await self.limiter.close()

    def sample_in_flight(self) -> None:
        """Set the in-flight gauge from the per-replica counts (on a timer, not per request)."""
        per_model: dict[str, int] = {}
        for model in self.table.loaded:
            per_model[model] = sum(
                self.inflight.get(e.placement_id, 0) for e in self.table.endpoints(model)
            )
        for model, n in per_model.items():
            router_metrics.IN_FLIGHT.labels(model).set(n)
            router_metrics.ENDPOINTS.labels(model).set(len(self.table.endpoints(model)))

    def _done(self, model: str, route: str, status: int) -> None:
        self.labels.requests(model, route, status).inc()

    def route_handler(self, route: str) -> Any:
        """The request handler for one of the `FORWARDED` routes."""

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handle(request, route)

        return handle

    async def handle(self, request: web.Request, route: str) -> web.StreamResponse:
        started = time.perf_counter()
        key = await self._caller(request, route)
        if isinstance(key, web.Response):
            return key
        asked = await self._asked(request, route)
        if isinstance(asked, web.Response):
            return asked
        body, payload, model = asked
        refused = await self._refused(key, model, route)
        if refused is not None:
            return refused
        servable = self._servable(key, model, route)
        if isinstance(servable, web.Response):
            return servable
        candidates, spec = servable
        wanted = FORWARDED[route]
        prefix = (
            self.forwarder.prefix.keys(payload)
            if self.forwarder.prefix is not None and wanted is Task.CHAT
            else None
        )
        strip, client_bytes = False, len(body)
        if wanted is Task.CHAT and payload.get("stream") is True:
            # Ask for the stream's usage (counted per key), and take the chunk out on
            # the way back when the client did not ask for it.
            asked_for = ask_for_usage(body, payload)
            strip = asked_for is not None
            body = asked_for or body
        account = self.ledger.account(
            key if isinstance(key, ApiKey) else None, model, strip=strip, body_bytes=client_bytes
        )
        if self.usage is not None:
            self.usage.begin(model)
        try:
            response = await self._serve(
                request, route, body, model, payload, candidates, spec, started, prefix, account
            )
        except asyncio.CancelledError:
            # The client left: aiohttp cancelled this handler, and with it the upstream
            # request (see `_send`) and any hold.
            self._done(model, route, CLIENT_CLOSED)
            account.cut_short(0)
            raise
        finally:
            if self.usage is not None:
                self.usage.end(model)
        self._done(model, route, response.status)
        return response

    def _servable(
        self, key: ApiKey | bool, model: str, route: str
    ) -> tuple[list[Endpoint], ModelSpec | None] | web.Response:
        """Where the request can go: the model's replicas, or the catalog entry that a
        load on demand starts from (no replica yet); or why it cannot go anywhere."""
        candidates = self.table.endpoints(model)
        spec = None
        if not candidates:
            spec = self.ondemand.loadable(model) if self.ondemand is not None else None
            if spec is None:
                return self._not_served(model, route)
            if isinstance(key, ApiKey) and not key.on_demand:
                self._done(model, route, 403)
                return error(
                    403,
                    f"model {model!r} is not loaded, and this key may not load "
                    "models on demand; ask an operator to load it (nebula-cli model "
                    f"load {model})",
                    "on_demand_not_allowed",
                )
        wanted = FORWARDED[route]
        task = candidates[0].task if candidates else spec.task.value if spec else ""
        if wanted is not None and task and task != wanted:
            self._done(model, route, 400)
            return error(
                400,
                f"model {model!r} is a {task} model; {route} needs a {wanted.value} model "
                f"(send {task} requests to {TASK_ROUTES.get(Task(task), 'its own route')})",
                "wrong_model_task",
            )
        return candidates, spec

    async def _caller(self, request: web.Request, route: str) -> ApiKey | bool | web.Response:
        """Who is asking: their key (True on an open router), or the refusal."""
        key = self.keys.client(bearer(request.headers.get("Authorization")), self.table.api_keys)
        if key is None:
            self._done("", UNAUTHENTICATED, 401)
            return invalid_api_key()
        if key is True:
            foreign = self.keys.foreign_caller(request)
            if foreign is not None:
                self._done("", UNAUTHENTICATED, 403)
                return error(403, foreign, "foreign_origin")
            return True
        assert isinstance(key, ApiKey)
        rate = key.rate_per_s or self.keys.default_rate
        if rate:
            wait = await self.limiter.allow(key.digest, rate)
            if wait:
                self._done("", route, 429)
                return error(
                    429,
                    f"rate limit of {rate:g} requests per second exceeded for this key",
                    "rate_limit_exceeded",
                    {"Retry-After": str(max(1, round(wait + 0.5)))},
                )
        return key

    async def _asked(
        self, request: web.Request, route: str
    ) -> tuple[bytes, dict[str, Any], str] | web.Response:
        """What is asked: the body, its JSON and its model, or the refusal."""
        limit = self.settings.body_limit_bytes
        if request.content_length is not None and request.content_length > limit:
            self._done("", route, 413)
            return error(413, f"request body over the limit of {limit} bytes", "body_too_large")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._done("", route, 413)
            return error(413, f"request body over the limit of {limit} bytes", "body_too_large")
        try:
            payload = json_body.parse(body)
        except json_body.BadBody as exc:
            self._done("", route, 400)
            return error(400, str(exc), "invalid_json")
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not model:
            self._done("", route, 400)
            return error(
                400, "the body must be a JSON object with a `model` string", "missing_model"
            )
        return body, payload, model

    async def _refused(self, key: ApiKey | bool, model: str, route: str) -> web.Response | None:
        """The key's scope: its models and its token budget."""
        if not isinstance(key, ApiKey):
            return None
        if not allows(key.models, model):
            self._done(OTHER, route, 403)
            return error(
                403,
                f"this key may not use model {shown(model)}; it may use {', '.join(key.models)}",
                "model_not_allowed",
            )
        if key.token_budget is None:
            return None
        try:
            await self.ledger.admit(key)
        except BudgetExhausted as exc:
            self._done(model, route, 429)
            retry = str(max(1, round(exc.retry_after_s)))
            return error(429, str(exc), "budget_exhausted", {"Retry-After": retry})
        return None

    def _not_served(self, model: str, route: str) -> web.Response:
        """A model with no replica and no way to load one: why, in OpenAI's shape."""
        if model in self.table.unloading:
            self._done(model, route, 503)
            return error(
                503,
                f"model {model!r} is being unloaded; it serves no new requests. Load it "
                f"again (nebula-cli model load {model}) to use it",
                "model_unloading",
            )
        if model in self.table.loaded:
            self._done(model, route, 503)
            return error(
                503,
                f"model {model!r} has no healthy replica right now; retry shortly",
                "no_healthy_replica",
                {"Retry-After": NO_REPLICA_RETRY_AFTER},
            )
        served = ", ".join(self.table.healthy_models()) or "none"
        self._done(OTHER, route, 404)
        return error(
            404,
            f"model {shown(model)} is not served here; served models: {served}",
            "model_not_found",
        )

    async def _serve(
        self,
        request: web.Request,
        route: str,
        body: bytes,
        model: str,
        payload: dict[str, Any],
        candidates: list[Endpoint],
        spec: Any,
        started: float,
        prefix: Prompt | None,
        account: Account,
    ) -> web.StreamResponse:
        """Hold the request while its model loads (if it must) and while its replicas
        are busy (flow control), then forward it."""
        stream = None
        if not candidates:
            assert self.ondemand is not None and spec is not None
            try:
                held = await self.ondemand.hold(
                    request, model, spec, stream=payload.get("stream") is True
                )
            except Refused as refused:
                return error(refused.status, refused.message, refused.code, refused.headers)
            if held.answered:  # refused after keep-alives: the stream said why
                assert held.stream is not None
                return held.stream
            candidates, stream = held.endpoints, held.stream
        if self.flow is None:
            return await self._forward(
                request, route, body, model, candidates, started, prefix, account, stream
            )
        key = account.key  # None on an open router: one tenant, normal priority
        who, priority = (key.name, key.priority) if key is not None else ("", "normal")
        try:
            admitted = await self.flow.enter(
                request, model, who, priority, stream=payload.get("stream") is True, opened=stream
            )
        except Refused as refused:
            return error(refused.status, refused.message, refused.code, refused.headers)
        if admitted.answered:  # refused after keep-alives: the stream said why
            assert admitted.stream is not None
            return admitted.stream
        sent = time.perf_counter()
        try:
            return await self._forward(
                request, route, body, model, candidates, started, prefix, account, admitted.stream
            )
        finally:
            self.flow.release(model, admitted.band, time.perf_counter() - sent)

    async def _forward(
        self,
        request: web.Request,
        route: str,
        body: bytes,
        model: str,
        candidates: list[Endpoint],
        started: float,
        prefix: Prompt | None,
        account: Account,
        stream: web.StreamResponse | None,
    ) -> web.StreamResponse:
        latency, ttft = self.labels.get(model, route)
        response = await self.forwarder.forward(
            request, route, body, model, candidates, started, ttft, account, prefix, stream
        )
        if stream is not None and response is not stream:
            response = await into_stream(stream, response)
        latency.observe(time.perf_counter() - started)
        return response

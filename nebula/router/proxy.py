"""The OpenAI-compatible gateway: /v1 requests proxied to a healthy replica.

The hot path: check the key, read the body once, parse it once to find
`model`, choose a replica, send the same bytes on, and pass the answer back
as it arrives (SSE chunks are written as they come, never buffered).
A connect error or a 5xx before anything reached the client is retried on
another replica; after that, a failure ends the stream with an error event.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Any

import aiohttp
from aiohttp import web

from nebula.models import Endpoint, Task
from nebula.names import shown
from nebula.router import router_metrics
from nebula.router.auth import KeyRing, bearer
from nebula.router.balance import LeastOutstanding, Policy
from nebula.router.ondemand import OnDemand, Refused, UsageRecorder, into_stream
from nebula.router.openai_errors import error, invalid_api_key
from nebula.router.outliers import Outliers
from nebula.router.prefix import PrefixAffinity, prefix_of
from nebula.router.ratelimit import ClusterLimiter
from nebula.router.relay import Streams
from nebula.router.table import RoutingTable
from nebula.settings import Settings

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

# Engine response headers worth passing on; the rest describe the hop (connection,
# length, server, date) and aiohttp sets its own.
PASSED_HEADERS = ("Content-Type", "X-Request-Id", "Content-Encoding")


def answer_headers(upstream: Any) -> dict[str, str]:
    headers = {}
    for name in PASSED_HEADERS:
        value = upstream.get(name)
        if value is not None:
            headers[name] = value
    return headers


class Proxy:
    def __init__(
        self,
        settings: Settings,
        table: RoutingTable,
        keys: KeyRing,
        policy: Policy | None = None,
        *,
        engine_key: str = "",
        ondemand: OnDemand | None = None,
        usage: UsageRecorder | None = None,
    ) -> None:
        self.settings = settings
        self.table = table
        self.keys = keys
        self.policy = policy or LeastOutstanding()
        self.prefix = (
            PrefixAffinity(settings.prefix_load_factor, settings.prefix_chars)
            if settings.routing_policy == "prefix"
            else None
        )
        self.ondemand = ondemand
        self.usage = usage
        self.limiter = ClusterLimiter(settings.redis_url, settings.redis_sentinel_password)
        self.inflight: dict[str, int] = defaultdict(int)  # placement id -> requests in flight
        self.session: aiohttp.ClientSession | None = None
        self.streams = Streams(table, settings.idle_read_timeout_s)
        self.outliers = Outliers()
        table.listeners.append(lambda: self.outliers.keep_only(e.url for e in table.by_id.values()))
        self.labels = router_metrics.Labels()
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.first_byte_timeout_s,
        )
        self.upstream_headers = {"Content-Type": "application/json"}
        if engine_key:  # the configured key, or the one the node keeps (exposure.engine_key)
            self.upstream_headers["Authorization"] = f"Bearer {engine_key}"

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # engines set none; skip the jar's work
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        await self.limiter.close()

    def sample_in_flight(self) -> None:
        """Set the in-flight gauge from the per-replica counts (on a timer, not per request)."""
        per_model: dict[str, int] = {}
        for model in self.table.models:
            per_model[model] = sum(
                self.inflight.get(e.placement_id, 0) for e in self.table.endpoints(model)
            )
        for model, n in per_model.items():
            router_metrics.IN_FLIGHT.labels(model).set(n)
            router_metrics.ENDPOINTS.labels(model).set(len(self.table.endpoints(model)))

    def _eject(self, endpoint: Endpoint, why: str) -> None:
        seconds = self.outliers.failed(endpoint)
        router_metrics.EJECTIONS.labels(endpoint.model).inc()
        log.warning("%s: leaving %s out for %gs", why, endpoint.url, seconds)

    def _done(self, model: str, route: str, status: int) -> None:
        self.labels.requests(model, route, status).inc()

    def handler(self, route: str) -> Any:
        """The request handler for one of the `FORWARDED` routes."""

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handle(request, route)

        return handle

    async def handle(self, request: web.Request, route: str) -> web.StreamResponse:
        started = time.perf_counter()
        # Who is asking.
        key = self.keys.client(bearer(request.headers.get("Authorization")), self.table.api_keys)
        if key is None:
            self._done("", UNAUTHENTICATED, 401)
            return invalid_api_key()
        if key is not True:
            rate = key.rate_per_s or self.keys.default_rate  # type: ignore[union-attr]
            if rate:
                wait = await self.limiter.allow(key.digest, rate)  # type: ignore[union-attr]
                if wait:
                    self._done("", route, 429)
                    return error(
                        429,
                        f"rate limit of {rate:g} requests per second exceeded for this key",
                        "rate_limit_exceeded",
                        {"Retry-After": str(max(1, round(wait + 0.5)))},
                    )
        # What is asked.
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
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            self._done("", route, 400)
            return error(400, f"the body is not valid JSON: {exc}", "invalid_json")
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not model:
            self._done("", route, 400)
            return error(400, "the body must be a JSON object with a `model` string",
                         "missing_model")  # fmt: skip
        candidates = self.table.endpoints(model)
        spec = None
        if not candidates:
            spec = self.ondemand.loadable(model) if self.ondemand is not None else None
        if not candidates and spec is None:
            if model in self.table.unloading:
                self._done(model, route, 503)
                return error(
                    503,
                    f"model {model!r} is being unloaded; it serves no new requests. Load it "
                    f"again (nebula-cli model load {model}) to use it",
                    "model_unloading",
                )
            if model in self.table.models:
                self._done(model, route, 503)
                return error(
                    503,
                    f"model {model!r} has no healthy replica right now; retry shortly",
                    "no_healthy_replica",
                    {"Retry-After": "5"},
                )
            served = ", ".join(self.table.served()) or "none"
            self._done(OTHER, route, 404)
            return error(404, f"model {shown(model)} is not served here; served models: "
                         f"{served}", "model_not_found")  # fmt: skip
        wanted = FORWARDED[route]
        task = candidates[0].task if candidates else spec.task.value  # type: ignore[union-attr]
        if wanted is not None and task and task != wanted:
            self._done(model, route, 400)
            return error(
                400,
                f"model {model!r} is a {task} model; {route} needs a {wanted.value} model "
                f"(send {task} requests to {TASK_ROUTES.get(Task(task), 'its own route')})",
                "wrong_model_task",
            )
        prefix = (
            prefix_of(payload, self.prefix.chars)
            if self.prefix is not None and wanted is Task.CHAT
            else None
        )
        if self.usage is not None:
            self.usage.begin(model)
        try:
            stream = None
            if not candidates:
                assert self.ondemand is not None and spec is not None
                try:
                    held = await self.ondemand.hold(
                        request, model, spec, stream=payload.get("stream") is True
                    )
                except Refused as refused:
                    self._done(model, route, refused.status)
                    return error(refused.status, refused.message, refused.code, refused.headers)
                candidates, stream = held.endpoints, held.stream
                if not candidates:  # refused after keep-alives: the stream says why
                    self._done(model, route, 503)
                    return stream  # type: ignore[return-value]
            latency, ttft = self.labels.get(model, route)
            response = await self._forward(
                request, route, body, model, candidates, started, ttft, prefix, stream
            )
            if stream is not None and response is not stream:
                response = await into_stream(stream, response)
            latency.observe(time.perf_counter() - started)
            self._done(model, route, response.status)
            return response
        finally:
            if self.usage is not None:
                self.usage.end(model)

    async def _forward(
        self,
        request: web.Request,
        path: str,
        body: bytes,
        model: str,
        candidates: list[Endpoint],
        started: float,
        ttft: Any,
        prefix: str | None = None,
        stream: web.StreamResponse | None = None,
    ) -> web.StreamResponse:
        assert self.session is not None
        settings = self.settings
        tried: set[str] = set()
        last_error = "no replica answered"
        usable, ejected = self.outliers.split(candidates)
        for attempt in range(settings.max_retries + 1):
            left = [c for c in usable if c.placement_id not in tried] if tried else usable
            if not left:  # replicas left out after failed connects: a last resort
                left = [c for c in ejected if c.placement_id not in tried]
            if not left:
                break
            if prefix is not None and not attempt:
                endpoint, own = self.prefix.choose(left, self.inflight, prefix)  # type: ignore[union-attr]
                self.labels.decision(model, "affinity" if own else "overflow").inc()
            else:
                endpoint = self.policy.choose(left, self.inflight)
                self.labels.decision(model, "least_outstanding").inc()
            tried.add(endpoint.placement_id)
            if attempt:
                router_metrics.RETRIES.labels(model).inc()
            self.inflight[endpoint.placement_id] += 1
            try:
                upstream = await self.session.post(
                    endpoint.url + path,
                    data=body,
                    headers=self.upstream_headers,
                    timeout=self.timeout,
                )
            except aiohttp.SocketTimeoutError:
                # Sent, and no answer in time: the engine may be working on it, so it is
                # never sent again (aiohttp's timeouts subclass its connection errors:
                # this clause must come first).
                self.inflight[endpoint.placement_id] -= 1
                router_metrics.UPSTREAM_ERRORS.labels(model, "timeout").inc()
                return error(504, f"replica on {endpoint.node} sent nothing for "
                             f"{settings.first_byte_timeout_s:g}s", "upstream_timeout")  # fmt: skip
            except (aiohttp.ClientConnectionError, aiohttp.ClientOSError, TimeoutError) as exc:
                # Not connected (refused, reset before an answer, connect timeout): retry.
                self.inflight[endpoint.placement_id] -= 1
                router_metrics.UPSTREAM_ERRORS.labels(model, "connect").inc()
                last_error = f"replica on {endpoint.node} unreachable ({type(exc).__name__})"
                self._eject(endpoint, last_error)
                continue
            self.outliers.answered(endpoint)
            retryable = len(tried) < len(candidates) and attempt < settings.max_retries
            try:
                if upstream.status in (401, 403):
                    # The client's key was good: the engine refused ours. Never pass that
                    # on as the client's fault.
                    router_metrics.UPSTREAM_ERRORS.labels(model, "engine_auth").inc()
                    log.error(
                        "replica on %s refused the internal engine key (HTTP %d); "
                        "check NEBULA_ENGINE_API_KEY on routers and nodes",
                        endpoint.node, upstream.status,
                    )  # fmt: skip
                    last_error = f"replica on {endpoint.node} refused the router's engine key"
                    if retryable:
                        continue
                    return error(502, f"no replica of {model!r} could answer: {last_error}",
                                 "upstream_unavailable")  # fmt: skip
                if upstream.status >= 500 and retryable:
                    router_metrics.UPSTREAM_ERRORS.labels(model, "status_5xx").inc()
                    last_error = f"replica on {endpoint.node} answered {upstream.status}"
                    continue
                headers = answer_headers(upstream.headers)
                if headers.get("Content-Type", "").startswith("text/event-stream"):
                    return await self.streams.relay(
                        request, upstream, headers, model, started=started, ttft=ttft,
                        response=stream,
                    )  # fmt: skip
                # Not streamed: read it whole (nothing has reached the client yet, so a
                # replica that dies now is retried like one that never answered).
                try:
                    data = await upstream.read()
                except aiohttp.SocketTimeoutError:
                    router_metrics.UPSTREAM_ERRORS.labels(model, "timeout").inc()
                    timeout = settings.first_byte_timeout_s
                    return error(504, f"replica on {endpoint.node} stopped sending for "
                                 f"{timeout:g}s", "upstream_timeout")  # fmt: skip
                except (aiohttp.ClientError, TimeoutError) as exc:
                    router_metrics.UPSTREAM_ERRORS.labels(model, "broken_stream").inc()
                    last_error = f"replica on {endpoint.node} broke off ({type(exc).__name__})"
                    continue
                router_metrics.count_usage(model, data)
                return web.Response(status=upstream.status, body=data, headers=headers)
            finally:
                self.inflight[endpoint.placement_id] -= 1
                upstream.release()
        return error(
            502, f"no replica of {model!r} could answer: {last_error}", "upstream_unavailable"
        )

"""Sending a request on to a replica: choose one, send, retry another on a failure
before the first byte, pass the answer back.

A connect error or a 5xx before anything reached the client is retried on
another replica; after that, a failure ends the stream with an error event
(`relay`). A client that leaves cancels its handler, and so the attempt: the
engine's connection is closed, and vLLM aborts the request. The in-flight count
of each replica is exact (taken and given back once per attempt, whatever ends
it) and holds only replicas in use; routers report it so that a drain can wait
for it (`store/inflight.py`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from nebula.models import Endpoint
from nebula.router import router_metrics
from nebula.router.accounting import Account
from nebula.router.balance import LeastOutstanding, Loads, Policy
from nebula.router.openai_errors import error, upstream_error
from nebula.router.outliers import Outliers
from nebula.router.prefix import PrefixAffinity
from nebula.router.prompt_keys import Prompt, with_session
from nebula.router.relay import Streams
from nebula.router.table import RoutingTable
from nebula.router.upstream import Broken, ReadTimeout, Response, Unreachable, Upstream
from nebula.router.usage_tap import from_answer
from nebula.settings import Settings

log = logging.getLogger(__name__)

# Engine response headers worth passing on (as read, in lower case, and as written);
# the rest describe the hop (connection, length, server, date) and aiohttp sets its own.
PASSED_HEADERS = (
    ("content-type", "Content-Type"),
    ("x-request-id", "X-Request-Id"),
    ("content-encoding", "Content-Encoding"),
)
# Header lines of every request to an engine (`upstream` adds Host and Content-Length).
UPSTREAM_HEADERS = b"Content-Type: application/json\r\nUser-Agent: nebula-router\r\n"
# Seconds a client is told to wait when a known model has no replica to answer.
NO_REPLICA_RETRY_AFTER = "5"


def answer_headers(upstream: dict[str, str]) -> dict[str, str]:
    headers = {}
    for read, written in PASSED_HEADERS:
        value = upstream.get(read)
        if value is not None:
            headers[written] = value
    return headers


class Forwarder:
    """The replicas' side of the proxy: the engines' connections, the in-flight counts,
    the routing policy, outlier ejection and the stream relay."""

    def __init__(
        self,
        settings: Settings,
        table: RoutingTable,
        policy: Policy | None = None,
        *,
        engine_key: Callable[[], str] = lambda: "",
    ) -> None:
        self.settings = settings
        self.policy = policy or LeastOutstanding()
        self.prefix = (
            PrefixAffinity(
                settings.prefix_load_factor,
                settings.prefix_load_slack,
                settings.prefix_chunk_chars,
                settings.prefix_chars,
                settings.prefix_index_keys,
            )
            if settings.routing_policy == "prefix"
            else None
        )
        self.inflight: dict[str, int] = defaultdict(int)  # placement id -> requests in flight
        self.loads = Loads(self.inflight)  # and what the engines report beyond it
        self.upstream = Upstream(settings.connect_timeout_s)
        self.streams = Streams(table, settings.idle_read_timeout_s)
        self.outliers = Outliers()
        table.listeners.append(lambda: self.outliers.keep_only(e.url for e in table.by_id.values()))
        self.labels = router_metrics.Labels()
        self._header_lines = UPSTREAM_HEADERS  # and the engine key's, once there is one
        self._keyed = False
        self._bad_key_logged = False
        # Replicas' concurrency targets bound the choice (flow control on).
        self.targets = settings.flow_control
        self.alone = True  # the only router process sending to these replicas (flow control)
        self.default_target = settings.max_concurrency
        self._engine_key = engine_key
        self.refresh_engine_key()

    def refresh_engine_key(self) -> None:
        """Take the engine key if there is one now (configured, or the one the node
        keeps: a router started before its node finds it once the node made it)."""
        if self._keyed:
            return
        key = self._engine_key()
        if not key:
            return
        if not key.isprintable():
            # Written into the request's head as it is: a line break would start a header.
            if not self._bad_key_logged:
                log.error("the engine key holds unprintable characters: not sent; set a plain one")
                self._bad_key_logged = True
            return
        self._header_lines = UPSTREAM_HEADERS + f"Authorization: Bearer {key}\r\n".encode()
        self._keyed = True

    async def stop(self) -> None:
        await self.upstream.close()

    def _eject(self, endpoint: Endpoint, why: str) -> None:
        seconds = self.outliers.failed(endpoint)
        router_metrics.EJECTIONS.labels(endpoint.model).inc()
        log.warning("%s: leaving %s out for %gs", why, endpoint.url, seconds)

    async def forward(
        self,
        request: web.Request,
        path: str,
        body: bytes,
        model: str,
        candidates: list[Endpoint],
        started: float,
        ttft: Any,
        account: Account,
        prefix: Prompt | None = None,
        stream: web.StreamResponse | None = None,
    ) -> web.StreamResponse:
        """Send to one replica after another until one answers (see the module's doc)."""
        tried: set[str] = set()
        failures = Failures()
        usable, ejected = self.outliers.split(candidates)
        for attempt in range(self.settings.max_retries + 1):
            endpoint = self._choose(model, usable, ejected, tried, prefix if not attempt else None)
            if endpoint is None:
                break
            tried.add(endpoint.placement_id)
            sent = body
            if prefix is not None and self.prefix is not None:
                self.prefix.record(prefix, endpoint.placement_id)
                if endpoint.kv_events and prefix.taggable:  # precise mode (agent/kv_watch.py)
                    sent = with_session(body, self.prefix.tag(prefix))
            if attempt:
                router_metrics.RETRIES.labels(model).inc()
            retryable = len(tried) < len(candidates) and attempt < self.settings.max_retries
            send = Send(
                request, path, sent, model, endpoint, retryable, started, ttft, stream, account
            )
            pid = endpoint.placement_id
            self.inflight[pid] += 1
            try:
                answer = await self._send(send, failures)
            finally:
                # Exactly once, whatever ended the attempt (the client leaving included).
                left = self.inflight[pid] - 1
                if left > 0:
                    self.inflight[pid] = left
                else:
                    del self.inflight[pid]  # pruned: the dict holds only replicas in use
            if answer is not None:
                return answer
        return failures.answer(model)

    def _choose(
        self,
        model: str,
        usable: Sequence[Endpoint],
        ejected: Sequence[Endpoint],
        tried: set[str],
        prefix: Prompt | None,
    ) -> Endpoint | None:
        left = [c for c in usable if c.placement_id not in tried] if tried else usable
        if not left:  # replicas left out after failed connects: a last resort
            left = [c for c in ejected if c.placement_id not in tried]
        if not left:
            return None
        if self.targets and len(left) > 1:
            # Flow control let the request through because some replica has a free
            # slot: never send it to one that is full while another is not.
            # Alone, its own count is exact; the engines' sampled reports would add
            # requests that ended since (phantoms) and mark a free replica full.
            loads = self.inflight if self.alone else self.loads
            free = [c for c in left if loads.get(c.placement_id, 0) < self._target(c)]
            left = free or left
        if prefix is not None and self.prefix is not None:
            choice = self.prefix.choose(left, self.loads, prefix)
            index = "precise" if choice.endpoint.kv_events else "approximate"
            self.labels.decision(model, choice.reason, index).inc()
            self.labels.prefix_matched().observe(choice.matched_chars)
            return choice.endpoint
        self.labels.decision(model, "least_outstanding").inc()
        return self.policy.choose(left, self.loads)

    def _target(self, endpoint: Endpoint) -> int:
        return endpoint.max_concurrency or self.default_target

    async def _send(self, send: Send, failures: Failures) -> web.StreamResponse | None:
        """One attempt: the answer to give, or None to try another replica."""
        endpoint, model = send.endpoint, send.model
        send.account.sent = True
        try:
            upstream = await self.upstream.post(
                endpoint.url,
                send.path,
                self._header_lines,
                send.body,
                self.settings.first_byte_timeout_s,
            )
        except ReadTimeout:
            # Sent, and no answer in time: the engine may be working on it, so it is
            # never sent again.
            router_metrics.UPSTREAM_ERRORS.labels(model, "timeout").inc()
            timeout = self.settings.first_byte_timeout_s
            return error(
                504, f"replica on {endpoint.node} sent nothing for {timeout:g}s", "upstream_timeout"
            )
        except Unreachable as exc:
            # Not connected (refused, reset before an answer, connect timeout): retry.
            router_metrics.UPSTREAM_ERRORS.labels(model, "connect").inc()
            failures.unreachable(f"replica on {endpoint.node} unreachable ({exc})")
            self._eject(endpoint, failures.last)
            return None
        self.outliers.answered(endpoint)
        try:
            answer = await self._answer(send, upstream, failures)
        except BaseException:
            # The client left (the handler was cancelled) or the relay failed: close the
            # connection, so that the engine sees it go and aborts the request (vLLM
            # does) instead of generating an answer for nobody.
            upstream.close()
            raise
        upstream.release()
        return answer

    async def _answer(
        self, send: Send, upstream: Response, failures: Failures
    ) -> web.StreamResponse | None:
        endpoint, model = send.endpoint, send.model
        if upstream.status in (401, 403):
            # The client's key was good: the engine refused ours. Never pass that on
            # as the client's fault.
            router_metrics.UPSTREAM_ERRORS.labels(model, "engine_auth").inc()
            log.error(
                "replica on %s refused the internal engine key (HTTP %d); "
                "check NEBULA_ENGINE_API_KEY on routers and nodes",
                endpoint.node,
                upstream.status,
            )
            failures.failed(f"replica on {endpoint.node} refused the router's engine key")
            return None if send.retryable else failures.answer(model)
        if upstream.status >= 500 and send.retryable:
            router_metrics.UPSTREAM_ERRORS.labels(model, "status_5xx").inc()
            failures.failed(f"replica on {endpoint.node} answered {upstream.status}")
            return None
        headers = answer_headers(upstream.headers)
        if headers.get("Content-Type", "").startswith("text/event-stream"):
            return await self.streams.relay(
                send.request,
                upstream,
                headers,
                model,
                started=send.started,
                ttft=send.ttft,
                account=send.account,
                response=send.stream,
            )
        # Not streamed: read it whole (nothing has reached the client yet, so a replica
        # that dies now is retried like one that never answered).
        try:
            data = await upstream.read(self.settings.first_byte_timeout_s)
        except ReadTimeout:
            router_metrics.UPSTREAM_ERRORS.labels(model, "timeout").inc()
            timeout = self.settings.first_byte_timeout_s
            return error(
                504,
                f"replica on {endpoint.node} stopped sending for {timeout:g}s",
                "upstream_timeout",
            )
        except Broken as exc:
            router_metrics.UPSTREAM_ERRORS.labels(model, "broken_stream").inc()
            failures.failed(f"replica on {endpoint.node} broke off ({exc})")
            return None
        if upstream.status >= 400:
            return upstream_error(upstream.status, data, headers)
        await send.account.settle(from_answer(data))
        return web.Response(status=upstream.status, body=data, headers=headers)


@dataclass(slots=True)
class Send:
    """One attempt's request: what is sent, to whom, and where the answer goes."""

    request: web.Request
    path: str
    body: bytes
    model: str
    endpoint: Endpoint
    retryable: bool
    started: float
    ttft: Any
    stream: web.StreamResponse | None
    account: Account


@dataclass(slots=True)
class Failures:
    """Why no replica has answered yet, and the answer to give if none does."""

    last: str = "no replica answered"
    attempts: int = 0
    unreachable_count: int = 0

    def unreachable(self, why: str) -> None:
        self.unreachable_count += 1
        self.failed(why)

    def failed(self, why: str) -> None:
        self.attempts += 1
        self.last = why

    def answer(self, model: str) -> web.Response:
        if self.attempts == self.unreachable_count:
            # No replica could be reached at all (its node died, its engine is gone):
            # the model is known but has no replica right now, as when none is listed.
            return error(
                503,
                f"model {model!r} has no reachable replica right now ({self.last}); retry shortly",
                "no_healthy_replica",
                {"Retry-After": NO_REPLICA_RETRY_AFTER},
            )
        return error(
            502, f"no replica of {model!r} could answer: {self.last}", "upstream_unavailable"
        )

"""Load on demand: a request for a catalog model that is not loaded is held while
the model loads, then served.

Each router process keeps one `Waiter` per model it holds requests for. The
waiter asks for the load once (a model request marked on-demand; when several
routers ask at once, Redis's WATCH lets one create it and the others find it
loaded), watches for the load failing, and wakes its held requests the moment
the routing table shows a healthy replica: the table refreshes on the agent's
"endpoints" event, so the wake-up follows the engine's first good health probe
by one Redis round trip. Holding is bounded: `hold_queue_limit` requests per
model per router process (over it: 429) and `hold_timeout_s` each (over it:
503; the load goes on). A held stream gets SSE comment lines every
`hold_keepalive_s`, so proxies and clients don't give up while the engine starts.

Routers also record each model's last use here (`UsageRecorder`), batched once
per `usage_flush_s`: the scheduler unloads idle models and evicts the least
recently used ones from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from aiohttp import web

from nebula.catalog import Catalog
from nebula.durations import parse_keep_alive, show_duration
from nebula.errors import Conflict, NebulaError, NotFound
from nebula.models import Endpoint, ModelSpec, Status
from nebula.process import wait_event
from nebula.router import router_metrics
from nebula.router.openai_errors import stream_error_event
from nebula.router.table import RoutingTable
from nebula.settings import Settings
from nebula.store import State

log = logging.getLogger(__name__)

STATUS_POLL_S = 1.0  # how often a waiter looks for the load having failed
RETRY_AFTER = "10"


class Refused(Exception):
    """A held request that cannot be served: an OpenAI-shaped error to send."""

    def __init__(self, status: int, message: str, code: str, retry_after_s: float = 0) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.retry_after = str(max(1, round(retry_after_s))) if retry_after_s else RETRY_AFTER

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after}


@dataclass
class Waiter:
    model: str
    spec: ModelSpec
    held: int = 0
    failure: str = ""
    retry_in_s: float = 0.0  # a failed load is removed (and tried again) after this
    done: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class Held:
    """What holding gave: the replicas to use, and the stream already answering
    the client (keep-alives were sent) or None."""

    endpoints: list[Endpoint]
    stream: web.StreamResponse | None = None
    answered: bool = False  # the stream already told the client why it was refused


class OnDemand:
    def __init__(
        self, state: State, table: RoutingTable, catalog: Catalog, settings: Settings
    ) -> None:
        self.state = state
        self.table = table
        self.catalog = catalog
        self.settings = settings
        self.waiters: dict[str, Waiter] = {}
        self.stopped = False  # the router's drain is over: holds end with router_stopped
        table.listeners.append(self._table_changed)

    def loadable(self, model: str) -> ModelSpec | None:
        """The spec of a catalog model a request may load (or wait for), else None."""
        if not self.settings.on_demand:
            return None
        spec = self.catalog.specs.get(model)
        return spec if spec is not None and spec.on_demand else None

    def holding(self, model: str) -> int:
        waiter = self.waiters.get(model)
        return waiter.held if waiter is not None else 0

    async def close(self) -> None:
        for waiter in list(self.waiters.values()):
            if waiter.task is not None:
                waiter.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter.task

    def stop_holding(self) -> None:
        """The router's drain is over: every held request ends now, saying why."""
        self.stopped = True
        for waiter in self.waiters.values():
            waiter.done.set()

    def _table_changed(self) -> None:
        for waiter in self.waiters.values():
            waiter.changed.set()
            if self.table.endpoints(waiter.model):
                waiter.done.set()

    async def hold(
        self, request: web.Request, model: str, spec: ModelSpec, *, stream: bool
    ) -> Held:
        """Wait for a healthy replica of `model`, loading it if nobody has; raise
        `Refused` (before anything was sent) or answer the stream with the error."""
        waiter = self.waiters.get(model)
        if waiter is None:
            waiter = self.waiters[model] = Waiter(model, spec)
            waiter.task = asyncio.create_task(self._drive(waiter), name=f"on-demand-{model}")
        if waiter.held >= self.settings.hold_queue_limit:
            router_metrics.HOLDS_REFUSED.labels(model).inc()
            text = f"{waiter.held} requests already wait for model {model!r} to load here"
            raise Refused(429, text + "; retry shortly", "model_loading_queue_full")
        waiter.held += 1
        router_metrics.HELD.labels(model).inc()
        started = time.monotonic()
        response: web.StreamResponse | None = None
        try:
            deadline = started + self.settings.hold_timeout_s
            while not waiter.done.is_set() and not self.stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    router_metrics.HOLD_TIMEOUTS.labels(model).inc()
                    raise Refused(
                        503,
                        f"model {model!r} is still loading after "
                        f"{self.settings.hold_timeout_s:g}s; retry shortly (the load "
                        "goes on)",
                        "model_loading",
                    )
                step = min(left, self.settings.hold_keepalive_s) if stream else left
                await wait_event(waiter.done, step)
                if stream and not waiter.done.is_set() and time.monotonic() < deadline:
                    response = await keep_alive(
                        request, response, f"waiting for model {model} to load"
                    )
            self._check_served(waiter)
            router_metrics.HOLD_SECONDS.labels(model).observe(time.monotonic() - started)
            return Held(self.table.endpoints(model), response)
        except Refused as refused:
            if response is None:
                raise
            await response.write(stream_error_event(refused.message, refused.code))
            await response.write_eof()
            return Held([], response, answered=True)
        finally:
            waiter.held -= 1
            router_metrics.HELD.labels(model).dec()

    def _check_served(self, waiter: Waiter) -> None:
        """After the wait: raise `Refused` unless a replica is there to serve."""
        model = waiter.model
        if self.stopped:
            raise Refused(
                503,
                "the router stopped (router_drain_s ran out) while this "
                f"request waited for model {model!r} to load; send it again",
                "router_stopped",
            )
        if waiter.failure:
            again = (
                f"; a request in {show_duration(waiter.retry_in_s)} tries again"
                if waiter.retry_in_s
                else ""
            )
            raise Refused(
                503,
                f"model {model!r} could not be loaded: {waiter.failure}{again}",
                "model_load_failed",
                waiter.retry_in_s,
            )
        if not self.table.endpoints(model):
            # Loaded, then gone again before this request woke (an unload, an engine
            # that died): never an empty answer.
            raise Refused(
                503,
                f"model {model!r} has no healthy replica right now; retry shortly",
                "no_healthy_replica",
                5,
            )

    async def _drive(self, waiter: Waiter) -> None:
        """Ask for the load once, watch it, wake the holders; end when it is served,
        failed, or nobody waits any more."""
        model, asked = waiter.model, False
        try:
            while not waiter.done.is_set():
                waiter.changed.clear()
                if self.table.endpoints(model):
                    waiter.done.set()
                    break
                if waiter.held == 0 and asked:
                    break  # every holder gave up; the load goes on without us
                try:
                    if model not in self.table.loaded and model not in self.table.unloading:
                        asked = await self._ask(waiter) or asked
                    else:
                        asked = True
                        request = await self.state.requests.get(model)
                        if request.status is Status.FAILED:
                            waiter.failure = request.message
                            removed_at = request.removed_after_failure_at
                            if removed_at is not None:
                                waiter.retry_in_s = max(1.0, removed_at - time.time())
                            waiter.done.set()
                            break
                except NotFound:
                    pass  # gone since the table was read: ask again next round
                except NebulaError as exc:
                    log.warning("on-demand load of %s: %s", model, exc.message)
                except Exception:
                    # A bug must not leave holders waiting for a wake-up that never comes.
                    log.exception("on-demand load of %s failed; retrying", model)
                await wait_event(waiter.changed, STATUS_POLL_S)
        finally:
            if self.waiters.get(model) is waiter:
                del self.waiters[model]

    async def _ask(self, waiter: Waiter) -> bool:
        """Create the on-demand load; True if it exists now (ours or another router's)."""
        spec = waiter.spec
        keep_alive = parse_keep_alive(spec.keep_alive or self.settings.keep_alive)
        try:
            await self.state.requests.create(
                spec,
                spec.min_replicas or 1,
                keep_alive_s=keep_alive,
                on_demand=True,
                max_replicas=spec.max_replicas,
            )
        except Conflict:
            return True  # another router (or worker) asked first: one load for all
        router_metrics.ON_DEMAND_LOADS.labels(waiter.model).inc()
        log.info("loading %s on demand (%d request(s) waiting)", waiter.model, waiter.held)
        return True


class UsageRecorder:
    """When each model was last used, written to Redis in batches (ZADD GT).

    A model with requests in progress (held or forwarded) counts as used at
    every flush, so the scheduler never sees it idle while it serves."""

    def __init__(self, state: State, interval_s: float) -> None:
        self.state = state
        self.interval_s = interval_s
        self.active: dict[str, int] = defaultdict(int)
        self.ended: dict[str, float] = {}

    def begin(self, model: str) -> None:
        self.active[model] += 1

    def end(self, model: str) -> None:
        self.active[model] -= 1
        self.ended[model] = time.time()

    def batch(self) -> dict[str, float]:
        now = time.time()
        batch = dict(self.ended)
        batch.update((m, now) for m, n in self.active.items() if n > 0)
        self.ended.clear()
        for m in [m for m, n in self.active.items() if n <= 0]:
            del self.active[m]
        return batch

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            batch = self.batch()
            try:
                await self.state.requests.mark_used(batch)
            except Exception as exc:
                # Never dies: without it, models in use would look idle to the scheduler.
                log.warning("recording last use failed (%s); retrying", exc)
                for model, at in batch.items():  # keep them for the next try
                    self.ended[model] = max(at, self.ended.get(model, 0.0))


async def keep_alive(
    request: web.Request, response: web.StreamResponse | None, text: str
) -> web.StreamResponse:
    """One SSE comment line to a waiting stream (opened with the first), so that
    proxies and clients do not give up on it."""
    if response is None:
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
    await response.write(f": {text}\n\n".encode())
    return response


async def into_stream(stream: web.StreamResponse, answer: web.StreamResponse) -> web.StreamResponse:
    """A whole answer sent down a stream that keep-alives already opened: as one SSE
    event when it succeeded, else as the stream's error event."""
    body = answer.body if isinstance(answer, web.Response) else b""
    raw = body if isinstance(body, bytes) else b""
    if answer.status < 400:
        await stream.write(b"data: " + raw + b"\n\ndata: [DONE]\n\n")
    else:
        try:
            err = json.loads(raw)["error"]
            message, code = str(err["message"]), str(err.get("code") or "upstream_error")
        except (ValueError, KeyError, TypeError):
            message, code = f"the replica answered HTTP {answer.status}", "upstream_error"
        await stream.write(stream_error_event(message, code))
    await stream.write_eof()
    return stream

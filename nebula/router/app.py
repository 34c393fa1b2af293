"""The router's aiohttp application: its routes, and the lifetime of what it holds
(the client session, the routing table's refresher, the metrics advertisement).
The processes that serve it are in `workers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from nebula import redis_health
from nebula.catalog import Catalog, load_catalog
from nebula.errors import NebulaError
from nebula.exporter import advertise
from nebula.exposure import engine_key, is_loopback
from nebula.models import ApiKey
from nebula.names import shown
from nebula.process import STOP_STEP_S, bounded
from nebula.router import admin, admin_keys, prefix_feed, router_metrics
from nebula.router.accounting import Ledger
from nebula.router.auth import KeyRing, bearer
from nebula.router.ondemand import OnDemand, UsageRecorder
from nebula.router.openai_errors import error, invalid_api_key
from nebula.router.proxy import FORWARDED, OTHER, Proxy
from nebula.router.table import RoutingTable
from nebula.settings import Settings
from nebula.store import State
from nebula.tenancy import allows

log = logging.getLogger(__name__)

PROXY = web.AppKey("proxy", Proxy)
# The in-flight sampler's period, and how long a router's in-flight report outlives it.
SAMPLE_S = 1.0
IN_FLIGHT_TTL_S = 5 * SAMPLE_S
# aiohttp waits this much longer than the drain for in-flight requests, so that the
# router cuts its streams itself first (see `draining`).
DRAIN_GRACE_S = 1.0

# Dot segments and encoded slashes or dots: a path that could mean another path
# once something downstream decodes or normalises it.
SUSPECT_PATH = re.compile(r"(^|/)\.{1,2}(/|$)|%2[ef]|%5c|\\", re.IGNORECASE)


async def report_in_flight(state: State, instance: str, proxy: Proxy, reported: bool) -> bool:
    """Tell drains what this process has in flight to each replica (see
    store/inflight.py); True while a report is stored. Nothing to say, and nothing
    said before: no write."""
    if not proxy.inflight and not reported:
        return False
    try:
        await state.in_flight.report(instance, proxy.inflight, IN_FLIGHT_TTL_S)
    except NebulaError as exc:
        log.debug("reporting requests in flight: %s", exc.message)
        return reported
    return bool(proxy.inflight)


async def sample_engine_load(state: State, table: RoutingTable, proxy: Proxy) -> None:
    """Take what the engines last reported of their load into the load bound."""
    try:
        loads = await state.engine_load.of(e.node for e in table.by_id.values())
    except NebulaError as exc:
        log.debug("reading the engines' load: %s", exc.message)
        return
    proxy.forwarder.loads.sampled({pid: x.running + x.waiting for pid, x in loads.items()})
    if proxy.flow is not None:
        proxy.flow.engines_waiting = {pid: x.waiting for pid, x in loads.items() if x.waiting}


async def share_slots(state: State, instance: str, proxy: Proxy) -> None:
    """Report this process's demand, read everyone's, take its share of the slots
    (router/flow_share.py). Without Redis, each process goes on with all the slots:
    the engines' own queues take the excess, and no process starves."""
    if proxy.flow is None:
        return
    try:
        await state.demand.report(instance, proxy.flow.demand())
        everyone = await state.demand.all()
    except NebulaError as exc:
        log.debug("sharing flow-control slots: %s", exc.message)
        proxy.flow.forget_others()
        proxy.forwarder.alone = False
        return
    proxy.flow.shared(everyone, instance)
    proxy.forwarder.alone = everyone.keys() <= {instance}


def build_app(settings: Settings, *, catalog: Catalog | None = None) -> web.Application:
    keys = KeyRing(
        settings.api_keys,
        settings.admin_key,
        settings.default_rate_per_s,
        open_allowed=is_loopback(settings.router_host) or settings.trusted_network,
        read_keys=settings.admin_read_keys,
        loopback=is_loopback(settings.router_host),
    )
    table = RoutingTable(merge_after_outage_s=settings.node_ttl_s)
    state = State.of(settings)
    catalog = catalog or load_catalog(
        settings.catalog_path, allow_test_engine=settings.allow_test_engine
    )
    ondemand = OnDemand(state, table, catalog, settings)
    usage = UsageRecorder(state, settings.usage_flush_s)
    ledger = Ledger(state, settings.usage_retention_days, settings.usage_flush_s)
    proxy = Proxy(
        settings,
        table,
        keys,
        engine_key=lambda: engine_key(settings, create=False),
        ondemand=ondemand,
        usage=usage,
        ledger=ledger,
    )
    app = web.Application(client_max_size=settings.body_limit_bytes)
    app[admin.STATE] = state
    app[admin.CATALOG] = catalog
    app[admin.TABLE] = table
    app[admin.INFLIGHT] = proxy.inflight
    app[admin.LOADS] = proxy.forwarder.loads
    app[PROXY] = proxy
    app[admin.BODY_LIMIT] = settings.body_limit_bytes
    app[admin.KEEP_ALIVE] = settings.keep_alive

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        instance = f"{socket.gethostname()}:{os.getpid()}"  # this worker, to other routers
        await proxy.start()
        await table.refresh(app[admin.STATE])
        refresher = asyncio.create_task(
            table.keep_fresh(app[admin.STATE], settings.routing_refresh_s), name="routing-table"
        )

        async def sample() -> None:
            while True:
                proxy.sample_in_flight()
                proxy.forwarder.refresh_engine_key()
                await asyncio.sleep(SAMPLE_S)

        async def report() -> None:
            # Its own task: a Redis that hangs delays the report, never the gauges.
            reported = False
            while True:
                reported = await report_in_flight(app[admin.STATE], instance, proxy, reported)
                await sample_engine_load(app[admin.STATE], table, proxy)
                await share_slots(app[admin.STATE], instance, proxy)
                await asyncio.sleep(SAMPLE_S)

        sampler = asyncio.create_task(sample(), name="in-flight-sampler")
        reporter = asyncio.create_task(report(), name="in-flight-reporter")
        host = (
            settings.node_address
            if settings.router_host in ("0.0.0.0", "::")
            else (settings.router_host)
        )
        address = f"{host}:{settings.router_port}"
        advertiser = asyncio.create_task(
            advertise(app[admin.STATE], "router", address, address, settings.heartbeat_interval_s),
            name="metrics-advertiser",
        )
        health = asyncio.create_task(
            redis_health.watch(app[admin.STATE], settings.heartbeat_interval_s),
            name="redis-health",
        )
        recorder = asyncio.create_task(usage.run(), name="last-use")
        accounting = asyncio.create_task(ledger.run(), name="token-usage")
        tasks = [refresher, sampler, reporter, advertiser, health, recorder, accounting]
        if proxy.forwarder.prefix is not None:
            shared = prefix_feed.share(app[admin.STATE], proxy.forwarder.prefix, instance)
            tasks.append(asyncio.create_task(shared, name="prefix-feed"))
        yield

        async def stop() -> None:
            await ondemand.close()
            for task in tasks:
                task.cancel()
            # All at once, and bounded: a task that waits on a peer (a TLS close) must
            # not hold up the rest.
            await asyncio.wait(tasks, timeout=STOP_STEP_S / 2)
            await ledger.flush()  # the last second's usage
            with contextlib.suppress(NebulaError):  # others take its slots at once
                await app[admin.STATE].demand.remove(instance)
            await proxy.stop()
            await app[admin.STATE].close()

        await bounded("stopping the router's tasks", stop(), STOP_STEP_S)

    app.cleanup_ctx.append(lifetime)

    async def draining(app: web.Application) -> None:
        # Runs as the router stops accepting, before aiohttp waits for in-flight
        # requests (`DRAIN_GRACE_S` longer): at the drain's end, end the streams still
        # running ourselves, each with an event that says why.
        def stop_all() -> None:
            proxy.streams.stop_all()
            ondemand.stop_holding()

        asyncio.get_running_loop().call_later(settings.router_drain_s, stop_all)

    app.on_shutdown.append(draining)

    def model_object(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "nebula"}

    def caller(request: web.Request) -> ApiKey | bool | web.Response:
        key = keys.client(bearer(request.headers.get("Authorization")), table.api_keys)
        if key is None:
            return invalid_api_key()
        foreign = keys.foreign_caller(request) if key is True else None
        return error(403, foreign, "foreign_origin") if foreign else key

    def visible(key: ApiKey | bool) -> list[str]:
        """The served models this key may use."""
        served = table.served()
        return [m for m in served if allows(key.models, m)] if isinstance(key, ApiKey) else served

    async def models(request: web.Request) -> web.Response:
        key = caller(request)
        if isinstance(key, web.Response):
            return key
        data = [model_object(m) for m in visible(key)]
        return web.json_response({"object": "list", "data": data})

    async def model(request: web.Request) -> web.Response:
        """`GET /v1/models/{id}`: the OpenAI SDK's `models.retrieve`."""
        key = caller(request)
        if isinstance(key, web.Response):
            return key
        name = request.match_info["id"]
        if name not in visible(key):
            return error(
                404,
                f"model {shown(name)} is not served here; served models: "
                f"{', '.join(table.served()) or 'none'}",
                "model_not_found",
            )
        return web.json_response(model_object(name))

    async def health(request: web.Request) -> web.Response:
        """200 while the router can route; 503 once its table is older than
        `health_max_table_age_s` (it still serves from it, but a load balancer should
        prefer a router that can see the cluster)."""
        age = table.age()
        stale = age > settings.health_max_table_age_s
        if stale:
            status = f"failing: routing table {age:.0f}s old (state store unreachable)"
        elif not table.fresh:
            status = "degraded: state store unreachable, routing from the last table"
        else:
            status = "ok"
        return web.json_response(
            {
                "status": status,
                "models": len(table.by_model),
                "endpoints": sum(len(v) for v in table.by_model.values()),
                "table_age_s": round(age, 3) if age != float("inf") else None,
            },
            status=503 if stale else 200,
        )

    async def metrics_endpoint(request: web.Request) -> web.Response:
        if settings.metrics_require_key and not keys.admin(
            bearer(request.headers.get("Authorization")), write=False
        ):
            return error(
                401,
                "/metrics needs the admin key or a read-only key (metrics_require_key is on)",
                "invalid_admin_key",
            )
        # With several workers, merging their files is file I/O and parsing: done in a
        # thread, so that a scraper never stalls the event loop that serves /v1.
        body = await asyncio.to_thread(router_metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{id}", model)
    for path in FORWARDED:
        app.router.add_post(path, proxy.handler(path))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_endpoint)
    admin.add_routes(app, keys)
    admin_keys.add_routes(app, keys)

    async def unrouted(request: web.Request) -> web.Response:
        """Every path and method nothing else serves: an OpenAI-shaped 400, 404 or 405."""
        allowed: set[str] = set()
        for resource in app.router.resources():
            if resource is not catch_all:
                allowed |= (await resource.resolve(request))[1]
        if SUSPECT_PATH.search(request.raw_path.split("?", 1)[0]):
            status, text, code = (
                400,
                "the path holds dot segments or encoded slashes or dots; "
                "send the route's plain path",
                "invalid_path",
            )
        elif allowed:
            status, text, code = (
                405,
                f"{request.method} is not allowed on this route; "
                f"allowed: {', '.join(sorted(allowed))}",
                "method_not_allowed",
            )
        else:
            status, text, code = (
                404,
                "no such route; Nebula serves "
                f"{', '.join(sorted(FORWARDED))}, /v1/models, /admin/..., /health and "
                "/metrics (see docs/api.md)",
                "unknown_route",
            )
        router_metrics.REQUESTS.labels("", OTHER, str(status)).inc()
        return error(status, text, code)

    # Last: the routes above match first.
    catch_all = app.router.add_route("*", "/{tail:.*}", unrouted).resource
    return app

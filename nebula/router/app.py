"""The router process: the aiohttp application, its lifetime, and its workers.

`--workers N` runs N processes that each bind the port with SO_REUSEPORT; the
kernel spreads connections across them. Their Prometheus metrics are summed
through prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from nebula import redis_health
from nebula.catalog import Catalog, load_catalog
from nebula.errors import ConfigError
from nebula.exposure import engine_key, is_loopback
from nebula.metrics import advertise
from nebula.names import shown
from nebula.router import admin, metrics
from nebula.router.auth import Keys, bearer
from nebula.router.openai_errors import error, invalid_api_key
from nebula.router.protocol import Runner
from nebula.router.proxy import FORWARDED, OTHER, Proxy
from nebula.router.table import RoutingTable
from nebula.settings import Settings
from nebula.store import State

log = logging.getLogger(__name__)

PROXY = web.AppKey("proxy", Proxy)

# Dot segments and encoded slashes or dots: a path that could mean another path
# once something downstream decodes or normalises it.
SUSPECT_PATH = re.compile(r"(^|/)\.{1,2}(/|$)|%2[ef]|%5c|\\", re.IGNORECASE)


def build_app(settings: Settings, *, catalog: Catalog | None = None) -> web.Application:
    keys = Keys(
        settings.api_keys,
        settings.admin_key,
        settings.default_rate_per_s,
        open_allowed=is_loopback(settings.router_host) or settings.trusted_network,
        read_keys=settings.admin_read_keys,
    )
    table = RoutingTable(merge_after_outage_s=settings.node_ttl_s)
    proxy = Proxy(settings, table, keys, engine_key=engine_key(settings, create=False))
    app = web.Application(client_max_size=settings.body_limit_bytes)
    app[admin.STATE] = State.of(settings)
    app[admin.CATALOG] = catalog or load_catalog(settings.catalog_path)
    app[admin.TABLE] = table
    app[admin.INFLIGHT] = proxy.inflight
    app[PROXY] = proxy
    app[admin.BODY_LIMIT] = settings.body_limit_bytes

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await proxy.start()
        await table.refresh(app[admin.STATE])
        refresher = asyncio.create_task(
            table.keep_fresh(app[admin.STATE], settings.routing_refresh_s), name="routing-table"
        )

        async def sample() -> None:
            while True:
                proxy.sample_in_flight()
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample(), name="in-flight-sampler")
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
        yield
        for task in (refresher, sampler, advertiser, health):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await proxy.stop()
        await app[admin.STATE].close()

    app.cleanup_ctx.append(lifetime)

    def model_object(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "nebula"}

    async def models(request: web.Request) -> web.Response:
        if keys.client(bearer(request.headers.get("Authorization")), table.api_keys) is None:
            return invalid_api_key()
        data = [model_object(m) for m in table.served()]
        return web.json_response({"object": "list", "data": data})

    async def model(request: web.Request) -> web.Response:
        """`GET /v1/models/{id}`: the OpenAI SDK's `models.retrieve`."""
        if keys.client(bearer(request.headers.get("Authorization")), table.api_keys) is None:
            return invalid_api_key()
        name = request.match_info["id"]
        if name not in table.by_model:
            return error(404, f"model {shown(name)} is not served here; served models: "
                         f"{', '.join(table.served()) or 'none'}", "model_not_found")  # fmt: skip
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
        from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess

        registry: Any = REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{id}", model)
    for path in FORWARDED:
        app.router.add_post(path, proxy.handler(path))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_endpoint)
    admin.add_routes(app, keys)

    async def unrouted(request: web.Request) -> web.Response:
        """Every path and method nothing else serves: an OpenAI-shaped 400, 404 or 405."""
        allowed: set[str] = set()
        for resource in app.router.resources():
            if resource is not catch_all:
                allowed |= (await resource.resolve(request))[1]
        if SUSPECT_PATH.search(request.raw_path.split("?", 1)[0]):
            status, text, code = 400, "the path holds dot segments or encoded slashes or dots; "\
                "send the route's plain path", "invalid_path"  # fmt: skip
        elif allowed:
            status, text, code = 405, f"{request.method} is not allowed on this route; " \
                f"allowed: {', '.join(sorted(allowed))}", "method_not_allowed"  # fmt: skip
        else:
            status, text, code = 404, "no such route; Nebula serves " \
                f"{', '.join(sorted(FORWARDED))}, /v1/models, /admin/..., /health and " \
                "/metrics (see docs/api.md)", "unknown_route"  # fmt: skip
        metrics.REQUESTS.labels("", OTHER, str(status)).inc()
        return error(status, text, code)

    # Last: the routes above match first.
    catch_all = app.router.add_route("*", "/{tail:.*}", unrouted).resource
    return app


async def check_exposure(settings: Settings) -> None:
    """Refuse to serve an open router beyond loopback unless told the network is trusted."""
    if is_loopback(settings.router_host) or settings.trusted_network:
        return
    state = State.of(settings)
    try:
        stored = await state.api_keys.all()
    finally:
        await state.close()
    missing = []
    if not settings.api_keys and not stored:
        missing.append("no API keys for /v1 (NEBULA_API_KEYS, or POST /admin/keys)")
    if not settings.admin_key:
        missing.append("no admin key for /admin (NEBULA_ADMIN_KEY)")
    if missing:
        raise ConfigError(
            f"refusing to listen on {settings.router_host} with {' and '.join(missing)}; "
            "set the keys, listen on 127.0.0.1, or set NEBULA_TRUSTED_NETWORK=true"
        )


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.router_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.router_host, settings.router_port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve_one(settings: Settings) -> None:
    app = build_app(settings)
    runner = Runner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, _bind(settings))
    await site.start()
    log.info(
        "router listening on http://%s:%d (pid %d)",
        settings.router_host, settings.router_port, os.getpid(),
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _die_with_parent(parent: int) -> None:
    """Linux: this worker gets SIGTERM when the process that started it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:  # not Linux: the parent's own shutdown still stops workers
        pass
    # Compared with the parent's own pid, not with 1: as PID 1 in a container the
    # parent *is* 1, and a worker that checked for 1 would exit at once.
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(0)


def _worker(settings: Settings, parent: int) -> None:
    from nebula.daemons import run_async

    _die_with_parent(parent)
    run_async(_serve_one(settings))


RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)


async def serve(settings: Settings) -> None:
    await check_exposure(settings)
    if settings.router_workers == 1:
        await _serve_one(settings)
        return
    ctx = multiprocessing.get_context("spawn")
    me = os.getpid()

    def start(i: int) -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=_worker, args=(settings, me), name=f"router-{i}")
        proc.start()
        return proc

    procs = [start(i) for i in range(settings.router_workers)]
    crashes = [0] * len(procs)
    restart_at = [0.0] * len(procs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            now = time.monotonic()
            for i, proc in enumerate(procs):
                if proc.is_alive() or stop.is_set():
                    continue
                if not restart_at[i]:
                    # A worker died: the others keep serving; start another after a
                    # back-off that grows if it keeps dying.
                    delay = RESTART_BACKOFF_S[min(crashes[i], len(RESTART_BACKOFF_S) - 1)]
                    log.error("router worker %s died (exit %s); restarting in %gs",
                              proc.name, proc.exitcode, delay)  # fmt: skip
                    crashes[i] += 1
                    restart_at[i] = now + delay
                elif now >= restart_at[i]:
                    restart_at[i] = 0.0
                    procs[i] = start(i)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)

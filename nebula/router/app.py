"""The router's aiohttp application: what it holds, its routes, and its drain. Its
background tasks are in `background`, its own public routes in `public`, and the
processes that serve it in `workers`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from nebula.catalog import Catalog, load_catalog
from nebula.exposure import engine_key, is_loopback
from nebula.router import admin, admin_keys, public
from nebula.router.accounting import Ledger
from nebula.router.auth import KeyRing
from nebula.router.background import Background
from nebula.router.ondemand import OnDemand, UsageRecorder
from nebula.router.proxy import FORWARDED, Proxy
from nebula.router.table import RoutingTable
from nebula.settings import Settings
from nebula.store import State

log = logging.getLogger(__name__)

PROXY = web.AppKey("proxy", Proxy)
# aiohttp waits this much longer than the drain for in-flight requests, so that the
# router cuts its streams itself first (see `draining`).
DRAIN_GRACE_S = 1.0


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
    _keep(app, settings, keys, state, catalog, table, proxy)
    background = Background(settings, state, table, proxy, ondemand, usage, ledger)
    app.cleanup_ctx.append(background.lifetime)
    app.on_shutdown.append(_draining(settings, proxy, ondemand))
    public.add_routes(app)
    for path in FORWARDED:
        app.router.add_post(path, proxy.route_handler(path))
    admin.add_routes(app, keys)
    admin_keys.add_routes(app, keys)
    public.add_catch_all(app)
    return app


def _keep(
    app: web.Application,
    settings: Settings,
    keys: KeyRing,
    state: State,
    catalog: Catalog,
    table: RoutingTable,
    proxy: Proxy,
) -> None:
    """What the handlers reach through the application."""
    app[public.SETTINGS] = settings
    app[public.KEYRING] = keys
    app[public.ROUTING] = table
    app[admin.STATE] = state
    app[admin.CATALOG] = catalog
    app[admin.TABLE] = table
    app[admin.INFLIGHT] = proxy.inflight
    app[admin.LOADS] = proxy.forwarder.loads
    app[PROXY] = proxy
    app[admin.BODY_LIMIT] = settings.body_limit_bytes
    app[admin.KEEP_ALIVE] = settings.keep_alive


def _draining(
    settings: Settings, proxy: Proxy, ondemand: OnDemand
) -> Callable[[web.Application], Awaitable[None]]:
    async def draining(app: web.Application) -> None:
        # Runs as the router stops accepting, before aiohttp waits for in-flight
        # requests (`DRAIN_GRACE_S` longer): at the drain's end, end the streams still
        # running ourselves, each with an event that says why.
        def stop_all() -> None:
            proxy.streams.stop_all()
            ondemand.stop_holding()

        asyncio.get_running_loop().call_later(settings.router_drain_s, stop_all)

    return draining

"""The router's own public routes beside the proxied ones: `/v1/models`,
`/v1/models/{id}`, `/health`, `/metrics`, and the OpenAI-shaped answer to every
path and method nothing serves."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web

from nebula.models import ApiKey
from nebula.names import shown
from nebula.router import router_metrics
from nebula.router.auth import KeyRing, bearer
from nebula.router.openai_errors import error, invalid_api_key
from nebula.router.proxy import FORWARDED, OTHER
from nebula.router.table import RoutingTable
from nebula.settings import Settings
from nebula.tenancy import allows

SETTINGS = web.AppKey("settings", Settings)
KEYRING = web.AppKey("keyring", KeyRing)
ROUTING = web.AppKey("routing", RoutingTable)
CATCH_ALL = web.AppKey("catch_all", web.AbstractResource)

# Dot segments and encoded slashes or dots: a path that could mean another path
# once something downstream decodes or normalises it.
SUSPECT_PATH = re.compile(r"(^|/)\.{1,2}(/|$)|%2[ef]|%5c|\\", re.IGNORECASE)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{id}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_endpoint)


def add_catch_all(app: web.Application) -> None:
    """Last: every route added before matches first."""
    resource = app.router.add_route("*", "/{tail:.*}", unrouted).resource
    assert resource is not None
    app[CATCH_ALL] = resource


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "nebula"}


def caller(request: web.Request) -> ApiKey | bool | web.Response:
    keys, table = request.app[KEYRING], request.app[ROUTING]
    key = keys.client(bearer(request.headers.get("Authorization")), table.api_keys)
    if key is None:
        return invalid_api_key()
    foreign = keys.foreign_caller(request) if key is True else None
    return error(403, foreign, "foreign_origin") if foreign else key


def visible(table: RoutingTable, key: ApiKey | bool) -> list[str]:
    """The served models this key may use."""
    served = table.healthy_models()
    return [m for m in served if allows(key.models, m)] if isinstance(key, ApiKey) else served


async def models(request: web.Request) -> web.Response:
    key = caller(request)
    if isinstance(key, web.Response):
        return key
    data = [model_object(m) for m in visible(request.app[ROUTING], key)]
    return web.json_response({"object": "list", "data": data})


async def model(request: web.Request) -> web.Response:
    """`GET /v1/models/{id}`: the OpenAI SDK's `models.retrieve`."""
    key = caller(request)
    if isinstance(key, web.Response):
        return key
    name = request.match_info["id"]
    table = request.app[ROUTING]
    if name not in visible(table, key):
        return error(
            404,
            f"model {shown(name)} is not served here; served models: "
            f"{', '.join(table.healthy_models()) or 'none'}",
            "model_not_found",
        )
    return web.json_response(model_object(name))


async def health(request: web.Request) -> web.Response:
    """200 while the router can route; 503 once its table is older than
    `health_max_table_age_s` (it still serves from it, but a load balancer should
    prefer a router that can see the cluster)."""
    table, settings = request.app[ROUTING], request.app[SETTINGS]
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
            "models": len(table.healthy),
            "endpoints": sum(len(v) for v in table.healthy.values()),
            "table_age_s": round(age, 3) if age != float("inf") else None,
        },
        status=503 if stale else 200,
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    settings, keys = request.app[SETTINGS], request.app[KEYRING]
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


async def unrouted(request: web.Request) -> web.Response:
    """Every path and method nothing else serves: an OpenAI-shaped 400, 404 or 405."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.app[CATCH_ALL]:
            allowed |= (await resource.resolve(request))[1]
    if SUSPECT_PATH.search(request.raw_path.split("?", 1)[0]):
        status, text, code = (
            400,
            "the path holds dot segments or encoded slashes or dots; send the route's plain path",
            "invalid_path",
        )
    elif allowed:
        status, text, code = (
            405,
            f"{request.method} is not allowed on this route; allowed: {', '.join(sorted(allowed))}",
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
    router_metrics.TALLY.counter(router_metrics.REQUESTS, "", OTHER, str(status)).inc()
    return error(status, text, code)

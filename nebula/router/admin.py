"""The admin API under /admin: the one write path for nebula-cli and nebula-shell.

JSON in and out. Validation errors are 400, unknown names 404, conflicts 409,
Redis unreachable 503; every error in OpenAI's error shape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from nebula.catalog import Catalog
from nebula.durations import parse_keep_alive
from nebula.errors import InvalidRequest, NebulaError
from nebula.names import check_name, check_ref
from nebula.replicas import parse_replicas
from nebula.router import json_body, origin
from nebula.router.auth import KeyRing, bearer
from nebula.router.balance import Loads
from nebula.router.openai_errors import error
from nebula.router.table import RoutingTable
from nebula.router.views import node_view, placement_view, request_view
from nebula.store import State

STATE = web.AppKey("state", State)
CATALOG = web.AppKey("catalog", Catalog)
TABLE = web.AppKey("table", RoutingTable)
INFLIGHT = web.AppKey("inflight", dict)
LOADS = web.AppKey("loads", Loads)
BODY_LIMIT = web.AppKey("body_limit", int)
KEEP_ALIVE = web.AppKey("keep_alive", str)  # the default for on-demand loads and unpin

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOAD_FIELDS = {
    "model",
    "replicas",
    "gpu_memory_utilization",
    "cpu_memory_gib",
    "tensor_parallel_size",
    "engine_args",
    "keep_alive",
}


def guarded(keys: KeyRing, handler: Handler, *, write: bool) -> Handler:
    """`handler` behind the admin key (or a read-only key, for a route that only reads),
    with Nebula's errors in OpenAI's shape.

    A wrapper per route, not a middleware: a middleware would run on every /v1
    request too.
    """

    async def guard(request: web.Request) -> web.StreamResponse:
        refused = _refused(keys, request, write=write)
        if refused is not None:
            return refused
        try:
            for name, value in request.match_info.items():
                check_ref(value, f"the {name} in the path")
            return await handler(request)
        except NebulaError as exc:
            headers = {"Retry-After": "5"} if exc.status == 503 else None
            return error(exc.status, exc.message, exc.code, headers)
        except web.HTTPRequestEntityTooLarge:
            limit = request.app[BODY_LIMIT]
            return error(413, f"request body over the limit of {limit} bytes", "body_too_large")

    return guard


def _refused(keys: KeyRing, request: web.Request, *, write: bool) -> web.Response | None:
    """Who may call this route, and how: the key, a browser's marks, the body's type."""
    if not keys.admin(bearer(request.headers.get("Authorization")), write=write):
        return error(
            401,
            "missing or invalid admin key; send Authorization: Bearer KEY"
            + ("" if write else " (the admin key or a read-only key)"),
            "invalid_admin_key",
        )
    if keys.admin_open:
        foreign = keys.foreign_caller(request)
        if foreign is not None:
            return error(403, foreign, "foreign_origin")
    if request.method == "POST" and not origin.json_content(request.headers):
        # A web page can POST text/plain or a form anywhere without asking; JSON it can
        # not. (Any other method it cannot send across origins without a preflight.)
        return error(
            415,
            "admin POST routes take only Content-Type: application/json (even with no body)",
            "unsupported_media_type",
        )
    return None


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = json_body.parse(await request.read())
    except json_body.BadBody as exc:
        raise InvalidRequest(str(exc)) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


async def cluster(request: web.Request) -> web.Response:
    state = request.app[STATE]
    now = time.time()
    nodes = await state.nodes.live()
    placements = await state.placements.all(await state.nodes.ids())
    requests = await state.requests.all()
    last_used = await state.requests.last_used()
    inflight, loads = request.app[INFLIGHT], request.app[LOADS]
    endpoints = [
        {
            "placement_id": e.placement_id,
            "model": e.model,
            "node": e.node,
            "url": e.url,
            "in_flight": inflight.get(e.placement_id, 0),
            "load": loads.get(e.placement_id, 0),
        }
        for model in request.app[TABLE].healthy_models()
        for e in request.app[TABLE].endpoints(model)
    ]
    return web.json_response(
        {
            "nodes": [node_view(n, now) for n in nodes],
            "endpoints": endpoints,
            "placements": [placement_view(p, s) for p, s in placements],
            "models": [request_view(r, last_used, now) for r in requests],
            "leader": await state.lease.holder(),
        }
    )


async def list_models(request: web.Request) -> web.Response:
    state, now = request.app[STATE], time.time()
    requests = await state.requests.all()
    last_used = await state.requests.last_used()
    healthy = {m: len(request.app[TABLE].endpoints(m)) for m in request.app[TABLE].healthy_models()}
    views = [
        {**request_view(r, last_used, now), "ready_replicas": healthy.get(r.model, 0)}
        for r in requests
    ]
    return web.json_response({"models": views})


async def load_model(request: web.Request) -> web.Response:
    body = await read_json(request)
    unknown = set(body) - LOAD_FIELDS
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(LOAD_FIELDS))}"
        )
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("`model` must name a catalog model (see GET /admin/catalog)")
    check_name(name, "`model`")
    # An operator's load is pinned unless it names a keep-alive.
    keep_alive = None
    if body.get("keep_alive") is not None:
        keep_alive = parse_keep_alive(body["keep_alive"])
    overrides = {k: v for k, v in body.items() if k not in ("model", "replicas", "keep_alive")}
    spec = request.app[CATALOG].resolve(name, overrides)
    # A count or a range ("1..4"); none given: the catalog's range, else 1.
    given = body.get("replicas")
    low, high = (
        parse_replicas(given)
        if given is not None
        else (spec.min_replicas or 1, spec.max_replicas or spec.min_replicas or 1)
    )
    created = await request.app[STATE].requests.create(
        spec, low, keep_alive_s=keep_alive, max_replicas=high
    )
    return web.json_response(request_view(created), status=201)


async def pin_model(request: web.Request) -> web.Response:
    """`POST /admin/models/{ref}/pin`: never unloaded when idle, never evicted."""
    found = await request.app[STATE].requests.set_keep_alive(request.match_info["ref"], None)
    return web.json_response(request_view(found))


async def unpin_model(request: web.Request) -> web.Response:
    """`POST /admin/models/{ref}/unpin` `{"keep_alive": "10m"}` (default: the catalog's
    keep-alive for the model, else NEBULA_KEEP_ALIVE)."""
    body = await read_json(request) if request.can_read_body else {}
    unknown = set(body) - {"keep_alive"}
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(sorted(unknown))}; allowed: keep_alive")
    state = request.app[STATE]
    current = await state.requests.get(request.match_info["ref"])
    given = body.get("keep_alive") or current.spec.keep_alive or request.app[KEEP_ALIVE]
    keep_alive = parse_keep_alive(given)
    if keep_alive is None:
        raise InvalidRequest('unpin needs a keep-alive duration; "never" is what pin does')
    found = await state.requests.set_keep_alive(current.id, keep_alive)
    return web.json_response(request_view(found))


async def show_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    found = await state.requests.get(request.match_info["ref"])
    placements = [
        placement_view(p, s)
        for p, s in await state.placements.all(await state.nodes.ids())
        if p.request_id == found.id
    ]
    return web.json_response(
        {
            **request_view(found),
            "placements": placements,
            "events": await state.requests.events(found.id),
        }
    )


async def unload_model(request: web.Request) -> web.Response:
    """`?drain_timeout_s=N` bounds the wait for in-flight requests (0: stop now)."""
    raw = request.query.get("drain_timeout_s")
    drain = None
    if raw is not None:
        try:
            drain = float(raw)
        except ValueError:
            drain = -1.0
        if not 0 <= drain <= 86400:
            raise InvalidRequest("drain_timeout_s must be seconds from 0 (stop now) to 86400")
    unloading = await request.app[STATE].requests.unload(request.match_info["ref"], drain)
    return web.json_response(request_view(unloading), status=202)


async def list_nodes(request: web.Request) -> web.Response:
    now = time.time()
    return web.json_response(
        {"nodes": [node_view(n, now) for n in await request.app[STATE].nodes.live()]}
    )


async def node_action(request: web.Request) -> web.Response:
    node_id, action = request.match_info["node"], request.match_info["action"]
    state = request.app[STATE]
    if action == "cordon":
        await state.nodes.set_cordon(node_id, cordoned=True)
    elif action == "drain":
        await state.nodes.set_cordon(node_id, cordoned=True, drain=True)
    elif action == "uncordon":
        await state.nodes.set_cordon(node_id, cordoned=False)
    else:
        raise InvalidRequest(f"unknown node action {action!r}; use cordon, uncordon or drain")
    return web.json_response({"node": node_id, "action": action})


async def catalog(request: web.Request) -> web.Response:
    cat = request.app[CATALOG]
    return web.json_response(
        {"source": cat.source, "models": [cat[name].to_dict() for name in sorted(cat)]}
    )


async def discovery(request: web.Request) -> web.Response:
    """Prometheus HTTP service discovery: every live engine and every Nebula process."""
    groups: list[dict[str, Any]] = []
    table = request.app[TABLE]
    for model in table.healthy_models():
        for e in table.endpoints(model):
            host = e.url.split("://", 1)[-1].rstrip("/")
            labels = {
                "nebula_component": "engine",
                "model": model,
                "node": e.node,
                "placement": e.placement_id,
            }
            groups.append({"targets": [host], "labels": labels})
    for target in await request.app[STATE].targets.live():
        labels = {"nebula_component": target["kind"], "nebula_id": target["id"]}
        if target["kind"] == "agent":
            labels["node"] = target["id"]
        groups.append({"targets": [target["address"]], "labels": labels})
    return web.json_response(groups)


def add_routes(app: web.Application, keys: KeyRing) -> None:
    """The admin API under /admin; reads STATE, CATALOG, TABLE, INFLIGHT and LOADS
    from `app`."""
    routes = [
        ("GET", "/cluster", cluster),
        ("GET", "/models", list_models),
        ("POST", "/models", load_model),
        ("GET", "/models/{ref}", show_model),
        ("DELETE", "/models/{ref}", unload_model),
        ("POST", "/models/{ref}/pin", pin_model),
        ("POST", "/models/{ref}/unpin", unpin_model),
        ("GET", "/nodes", list_nodes),
        ("POST", "/nodes/{node}/{action}", node_action),
        ("GET", "/catalog", catalog),
        ("GET", "/sd", discovery),
    ]
    for method, path, handler in routes:
        write = method != "GET"
        app.router.add_route(method, "/admin" + path, guarded(keys, handler, write=write))

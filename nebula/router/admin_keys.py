"""The admin API's tenants: client keys with their scopes, and token usage.

    GET    /admin/keys            every key (never the key itself: only its hash is kept)
    POST   /admin/keys            create one; the answer holds the key, shown this once
    GET    /admin/keys/{name}     one key, with what it spent of its budget this period
    DELETE /admin/keys/{name}     revoke it (one atomic step: every router drops it)
    GET    /admin/usage           tokens per key, model and UTC day (?days=N&key=K&model=M)

All of them need the full admin key: key names and usage are the tenants' business.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from nebula.errors import InvalidRequest
from nebula.models import ApiKey
from nebula.names import check_name
from nebula.router.admin import STATE, Handler, guarded, read_json
from nebula.router.auth import KeyRing
from nebula.tenancy import check_budget, check_models, check_priority, day_of, period_of

KEY_FIELDS = (
    "name",
    "rate_per_s",
    "models",
    "on_demand",
    "priority",
    "token_budget",
    "budget_period",
)
MAX_USAGE_DAYS = 400
DAY_S = 86400


def key_view(key: ApiKey) -> dict[str, Any]:
    return {
        "name": key.name,
        "rate_per_s": key.rate_per_s,
        "models": list(key.models) or None,
        "on_demand": key.on_demand,
        "priority": key.priority,
        "token_budget": key.token_budget,
        "budget_period": key.budget_period,
        "created_at": key.created_at,
    }


def scope_of(body: dict[str, Any]) -> dict[str, Any]:
    """A new key's fields from a request body, each checked; InvalidRequest says what is
    wrong with the first that is."""
    unknown = set(body) - set(KEY_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(KEY_FIELDS)}"
        )
    rate = body.get("rate_per_s")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1e6
    ):
        raise InvalidRequest("`rate_per_s` must be a number above 0 (at most 1e6), or null")
    on_demand = body.get("on_demand", True)
    if not isinstance(on_demand, bool):
        raise InvalidRequest("`on_demand` must be true or false")
    budget, period = check_budget(body.get("token_budget"), body.get("budget_period"))
    return {
        "rate_per_s": rate,
        "models": check_models(body.get("models")),
        "on_demand": on_demand,
        "priority": check_priority(body.get("priority")),
        "token_budget": budget,
        "budget_period": period,
    }


async def list_keys(request: web.Request) -> web.Response:
    keys = await request.app[STATE].api_keys.all()
    return web.json_response({"keys": [key_view(k) for k in keys]})


async def create_key(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = check_name(body.get("name"), "`name`")
    scope = scope_of(body)
    secret = await request.app[STATE].api_keys.create(name, **scope)
    key = await request.app[STATE].api_keys.get(name)
    # The only time the key is shown: it is stored hashed.
    return web.json_response({**key_view(key), "key": secret}, status=201)


async def show_key(request: web.Request) -> web.Response:
    state = request.app[STATE]
    key = await state.api_keys.get(request.match_info["name"])
    view = key_view(key)
    period, ends = period_of(key.budget_period, time.time())
    view["spent"] = await state.usage.spent(key.name, period)
    view["period"] = period
    view["resets_at"] = ends
    return web.json_response(view)


async def delete_key(request: web.Request) -> web.Response:
    await request.app[STATE].api_keys.delete(request.match_info["name"])
    return web.json_response({"deleted": request.match_info["name"]})


async def usage(request: web.Request) -> web.Response:
    """`?days=N` (default 7: today and the 6 days before), `key=NAME`, `model=NAME`."""
    query = request.query
    unknown = set(query) - {"days", "key", "model"}
    if unknown:
        raise InvalidRequest(
            f"unknown parameter(s) {', '.join(sorted(unknown))}; allowed: days, key, model"
        )
    raw = query.get("days", "7")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_USAGE_DAYS:
        raise InvalidRequest(f"`days` must be a whole number from 1 to {MAX_USAGE_DAYS}")
    key = check_name(query["key"], "`key`") if "key" in query else None
    model = check_name(query["model"], "`model`") if "model" in query else None
    now = time.time()
    days = [day_of(now - i * DAY_S) for i in range(int(raw))]
    rows = await request.app[STATE].usage.report(days, key, model)
    return web.json_response({"days": days, "usage": [r.as_dict() for r in rows]})


def add_routes(app: web.Application, keys: KeyRing) -> None:
    """Behind the full admin key, every one (see the module's doc)."""
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/keys", list_keys),
        ("POST", "/keys", create_key),
        ("GET", "/keys/{name}", show_key),
        ("DELETE", "/keys/{name}", delete_key),
        ("GET", "/usage", usage),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, "/admin" + path, guarded(keys, handler, write=True))

"""Publishing an endpoint as a node's agent would: with the node's address registered
(routers route only to an endpoint at its node's address)."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

from nebula import redis_keys
from nebula.models import Endpoint
from nebula.store import State


async def register_address(state: State, node: str, url: str) -> None:
    """The address a node's heartbeat would hold, without a heartbeat (so no scheduler
    sees a node to place on)."""
    host = urlsplit(url).hostname or ""
    await state.redis.hset(redis_keys.node(node), "address", host)


async def announce(state: State, endpoint: Endpoint) -> None:
    await register_address(state, endpoint.node, endpoint.url)
    await state.endpoints.publish(endpoint)


async def known_by_every_worker(router_url: str, endpoints: int, timeout: float = 20.0) -> None:
    """Until every worker of a router knows `endpoints` endpoints: /health, each time
    on a new connection (which the kernel gives to any worker), says so 12 times in
    a row."""
    from harness.processes import http_bytes

    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < 12:
        status, _, body = await asyncio.to_thread(http_bytes, "GET", router_url + "/health")
        known = status == 200 and json.loads(body).get("endpoints", 0) >= endpoints
        in_a_row = in_a_row + 1 if known else 0
        assert time.monotonic() < deadline, f"the router's workers never knew {endpoints}"
        if not known:
            await asyncio.sleep(0.1)

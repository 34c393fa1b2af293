"""Publishing an endpoint as a node's agent would: with the node's address registered
(routers route only to an endpoint at its node's address)."""

from __future__ import annotations

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

"""Client API keys for /v1, stored hashed: the key itself is shown once, never stored.

Key: `nebula:api-keys` (hash name -> JSON {name, digest, rate_per_s, created_at}).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict

from redis.asyncio.client import Pipeline

from nebula import keys
from nebula.errors import Conflict, InvalidRequest, NotFound
from nebula.models import ApiKey, digest
from nebula.store import wire
from nebula.store.core import Core


def encode(key: ApiKey) -> str:
    return wire.dumps(asdict(key))


def decode(raw: str | bytes) -> ApiKey:
    return ApiKey(**wire.known(ApiKey, json.loads(raw)))


class ApiKeys:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def create(self, name: str, rate_per_s: float | None = None) -> str:
        """Store a new key's hash under `name`; the key itself is returned once."""
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
            raise InvalidRequest("a key name is 1-64 letters, digits, '-' or '_'")
        if rate_per_s is not None and not rate_per_s > 0:
            raise InvalidRequest(f"rate_per_s must be above 0, not {rate_per_s}")
        secret = "sk-nebula-" + secrets.token_urlsafe(24)
        key = ApiKey(
            name=name, digest=digest(secret), rate_per_s=rate_per_s, created_at=time.time()
        )
        async with self.core.reachable():
            if not await self.core.redis.hsetnx(keys.API_KEYS, name, encode(key)):
                raise Conflict(f"an API key named {name!r} exists; delete it first")
            await self._changed()
        return secret

    async def all(self) -> list[ApiKey]:
        async with self.core.reachable():
            raw = await self.core.redis.hvals(keys.API_KEYS)
        return sorted(wire.readable(decode, raw, "API key"), key=lambda k: k.name)

    async def delete(self, name: str) -> None:
        async with self.core.reachable():
            if not await self.core.redis.hdel(keys.API_KEYS, name):
                raise NotFound(f"no API key named {name!r}")
            await self._changed()

    async def _changed(self) -> None:
        async with self.core.redis.pipeline(transaction=True) as pipe:
            pipe.incr(keys.ROUTING_VERSION)
            pipe.publish(keys.EVENTS_CHANNEL, "api-keys")
            await pipe.execute()

    @staticmethod
    def stage_read_all(pipe: Pipeline) -> None:
        pipe.hvals(keys.API_KEYS)

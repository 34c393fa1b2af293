"""Client API keys for /v1, stored hashed: the key itself is shown once, never stored.

Key: `nebula:api-keys`, a hash: key name -> JSON {name, digest, rate_per_s,
created_at, models, on_demand, priority, token_budget, budget_period}.

Creating or deleting a key is one atomic step (a Lua script): the hash changes
and the routing version is bumped together, so no router can miss the change.
Before, a delete was two calls, and if the second failed every router went on
accepting the deleted key.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict
from typing import Any

from redis.asyncio.client import Pipeline

from nebula import redis_keys
from nebula.errors import Conflict, NotFound
from nebula.models import ApiKey, digest
from nebula.store import wire
from nebula.store.core import Core

# KEYS: the keys hash, the routing version. ARGV: name, the key's JSON ("" to delete),
# the events channel. Returns 1 when done, 0 when the name exists (create) or does
# not (delete).
_CHANGE = """
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1])
if (ARGV[2] == '' and exists == 0) or (ARGV[2] ~= '' and exists == 1) then
  return 0
end
-- The version first: if it cannot be bumped, nothing has changed (a script's
-- writes before an error are kept).
redis.call('INCR', KEYS[2])
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('PUBLISH', ARGV[3], 'api-keys')
return 1
"""


def encode(key: ApiKey) -> str:
    return wire.dumps(asdict(key))


def decode(raw: str | bytes) -> ApiKey:
    given: dict[str, Any] = wire.known(ApiKey, json.loads(raw))
    given["models"] = tuple(given.get("models") or ())
    return ApiKey(**given)


def new_secret() -> str:
    return "sk-nebula-" + secrets.token_urlsafe(24)


class ApiKeys:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._change = core.redis.register_script(_CHANGE)

    async def add(self, key: ApiKey) -> None:
        """Store `key` (its hash, never the secret); the caller checked its fields."""
        stored = ApiKey(**{**asdict(key), "created_at": time.time()})
        async with self.core.reachable():
            if not await self._run(key.name, encode(stored)):
                raise Conflict(f"an API key named {key.name!r} exists; delete it first")

    async def create(self, name: str, rate_per_s: float | None = None, **scope: Any) -> str:
        """A new key `name` with `scope` (ApiKey's fields): the key itself, returned once."""
        secret = new_secret()
        await self.add(ApiKey(name=name, digest=digest(secret), rate_per_s=rate_per_s, **scope))
        return secret

    async def get(self, name: str) -> ApiKey:
        async with self.core.reachable():
            raw = await self.core.redis.hget(redis_keys.API_KEYS, name)
        if raw is None:
            raise NotFound(f"no API key named {name!r} (see GET /admin/keys)")
        return decode(raw)

    async def all(self) -> list[ApiKey]:
        async with self.core.reachable():
            raw = await self.core.redis.hvals(redis_keys.API_KEYS)
        return sorted(wire.readable(decode, raw, "API key"), key=lambda k: k.name)

    async def delete(self, name: str) -> None:
        """Revoke: the key is gone and every router told, in one step."""
        async with self.core.reachable():
            if not await self._run(name, ""):
                raise NotFound(f"no API key named {name!r}")

    async def _run(self, name: str, value: str) -> int:
        done = await self._change(
            keys=[redis_keys.API_KEYS, redis_keys.ROUTING_VERSION],
            args=[name, value, redis_keys.EVENTS_CHANNEL],
        )
        return int(done)

    @staticmethod
    def stage_read_all(pipe: Pipeline) -> None:
        pipe.hvals(redis_keys.API_KEYS)

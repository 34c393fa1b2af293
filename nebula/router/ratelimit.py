"""Per-key request rates, shared by every router worker and every router through Redis.

One Lua script per request (GCRA, the generic cell rate algorithm: one key per
client key holding its "theoretical arrival time"), so the limit is the
cluster's, not rate x workers x routers. Redis's own clock is the only clock,
so routers with skewed clocks agree.

While Redis is away or slow, each process falls back to its own token bucket
at the same rate (so the cluster-wide limit is briefly rate x processes: an
outage should not turn into a refusal of every client), and tries Redis again
after a short pause instead of paying a timeout on every request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from nebula import redis_keys
from nebula.connection import Connection

log = logging.getLogger(__name__)

# KEYS[1]: the key's state. ARGV[1]: ms between requests at the rate (the emission
# interval); ARGV[2]: burst tolerance in ms. Returns 0 (go) or the ms to wait.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return math.ceil(wait) end
local new = tat + interval
redis.call('SET', KEYS[1], new, 'PX', math.ceil(new - now) + 1000)
return 0
"""

REDIS_TIMEOUT_S = 0.25  # a rate check must never hold a request for long
RETRY_AFTER_S = 5.0  # after a failure, local limits for this long before trying Redis


@dataclass
class _Bucket:
    tokens: float
    at: float


class LocalLimiter:
    """A token bucket per key in this process: `rate` per second, bursts up to max(1, rate)."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str, rate: float, now: float | None = None) -> float:
        """0 if the request may go now, else the seconds until it could."""
        now = time.monotonic() if now is None else now
        burst = max(1.0, rate)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=burst, at=now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate


class ClusterLimiter:
    """The same bucket shape as `LocalLimiter`, kept in Redis for the whole cluster."""

    def __init__(
        self, redis_url: str, sentinel_password: str = "", tls_ca_file: str | None = None
    ) -> None:
        self.connection = Connection(
            redis_url,
            sentinel_password=sentinel_password,
            tls_ca_file=tls_ca_file,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
        )
        self.redis: aioredis.Redis = self.connection.client
        self._script = self.redis.register_script(_GCRA)
        self.local = LocalLimiter()
        self._local_until = 0.0

    async def close(self) -> None:
        await self.connection.close()

    async def allow(self, key_digest: str, rate: float) -> float:
        """0 if a request with this key may go now, else the seconds until one could."""
        now = time.monotonic()
        if now < self._local_until:
            return self.local.allow(key_digest, rate, now)
        interval_ms = 1000.0 / rate
        tolerance_ms = (max(1.0, rate) - 1.0) * interval_ms
        try:
            wait_ms = await self._script(
                keys=[redis_keys.rate_limit(key_digest)], args=[interval_ms, tolerance_ms]
            )
        except (RedisError, OSError, TimeoutError) as exc:
            if self._local_until == 0.0 or now - self._local_until > RETRY_AFTER_S:
                log.warning(
                    "rate limits: Redis unavailable (%s); limiting per process for now",
                    type(exc).__name__,
                )
            self._local_until = now + RETRY_AFTER_S
            return self.local.allow(key_digest, rate, now)
        return float(wait_ms) / 1000.0

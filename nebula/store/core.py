"""The connection core: one Redis client, and one mapping of every Redis error.

Every store (one per aggregate, see the package's docstring) talks to Redis
through a `Core`. Redis being unreachable, read-only (a replica, a demoted
master), out of memory or loading is a `StateUnavailable` error, never a raw
redis-py exception: no loop dies of a kind of Redis error it did not expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nebula import redis_keys
from nebula.connection import Connection, parse_sentinel
from nebula.errors import StateUnavailable
from nebula.settings import redact

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 1.0


class Core:
    """A Redis connection (plain or through Sentinel) and what every store shares."""

    def __init__(
        self, url: str, *, sentinel_password: str = "", tls_ca_file: str | None = None
    ) -> None:
        self.url = url
        self.connection = Connection(
            url,
            sentinel_password=sentinel_password,
            tls_ca_file=tls_ca_file,
            decode_responses=True,
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            health_check_interval=10,
        )
        self.redis: aioredis.Redis = self.connection.client
        # When the last call failed for want of a writable master (None: it worked).
        self.unavailable_since: float | None = None
        # Bumped on every change of master (Sentinel): writes made just before it may
        # be lost, so loops treat it like the end of an outage (re-announce, grace).
        self.master_epoch = 0

    async def close(self) -> None:
        await self.connection.close()

    @contextlib.asynccontextmanager
    async def reachable(self) -> AsyncIterator[None]:
        """Run Redis calls, turning every Redis error into `StateUnavailable`
        (a lost WATCH race excepted: the caller retries or gives up)."""
        try:
            yield
            self.unavailable_since = None
        except MasterNotFoundError:
            self.unavailable_since = self.unavailable_since or time.time()
            sentinels = ", ".join(f"{h}:{p}" for h, p in parse_sentinel(self.url).sentinels)
            raise StateUnavailable(
                f"no Sentinel ({sentinels}) names a master for "
                f"{self.connection.master_name!r}: none answers, or none monitors that name; "
                "check the Sentinels and NEBULA_REDIS_URL"
            ) from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.unavailable_since = self.unavailable_since or time.time()
            raise StateUnavailable(
                f"cannot reach Redis at {redact(self.url)} ({exc}); is it running? "
                "Check NEBULA_REDIS_URL"
            ) from None
        except WatchError:
            raise
        except RedisError as exc:
            self.unavailable_since = self.unavailable_since or time.time()
            # READONLY (a replica, or a master demoted by Sentinel), OOM, LOADING, a
            # script or type error: the store cannot do this now.
            raise StateUnavailable(
                f"Redis at {redact(self.url)} refused the operation "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from None

    async def ping(self) -> None:
        async with self.reachable():
            await self.redis.ping()

    async def notify(self, what: str) -> None:
        """Wake every loop that listens; losing this message costs latency only."""
        async with self.reachable():
            await self.redis.publish(redis_keys.EVENTS_CHANNEL, what)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, channel: str = redis_keys.EVENTS_CHANNEL
    ) -> AsyncIterator[aioredis.client.PubSub]:
        async with self.reachable():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(channel)
        try:
            yield pubsub
        finally:
            # Bounded: closing a TLS connection can wait on the peer (seen at shutdown
            # with rediss://), and a stopping process must not.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(pubsub.aclose(), CLOSE_TIMEOUT_S)

    async def wake_on(self, event: asyncio.Event, channel: str, retry_s: float) -> None:
        """Set `event` on every message on `channel`, forever; resubscribe after a loss.

        Loops that use it also poll, so while Redis is away they only lose latency.
        """
        while True:
            try:
                async with self.subscribe(channel) as pubsub:
                    async for _ in pubsub.listen():
                        event.set()
            except Exception as exc:  # connection errors of every kind (redis-py's own too)
                log.debug("subscription to %s lost (%s)", channel, exc)
            await asyncio.sleep(retry_s)

"""Connecting to Redis: one plain master, or whichever master Sentinel names.

`redis_url` takes either form:

    redis://[USER:PASSWORD@]HOST:PORT/DB            (rediss:// for TLS, unix:///path)
    redis+sentinel://[USER:PASSWORD@]HOST:PORT,HOST:PORT,.../MASTER_NAME[/DB]
    rediss+sentinel://...                           (TLS to the Sentinels and the master)

In the Sentinel form the hosts are Sentinels (port 26379 when omitted), the
credentials are the Redis master's, and the Sentinels' own password, when
they have one, is a separate setting (`redis_sentinel_password`). redis-py's
Sentinel client asks the Sentinels for the master before each new connection
and drops a connection whose server answers READONLY (a master demoted by a
failover), so every process follows the master without a restart; pub/sub
subscriptions are made again on the new master by the loops that hold them.

With TLS (rediss://, rediss+sentinel://) the server's certificate is checked
against `tls_ca_file` (the `redis_tls_ca_file` setting), else the system's CAs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
TLS_SENTINEL_SCHEME = "rediss+sentinel"
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.startswith((SENTINEL_SCHEME + "://", TLS_SENTINEL_SCHEME + "://"))


def uses_tls(url: str) -> bool:
    return url.startswith(("rediss://", TLS_SENTINEL_SCHEME + "://"))


def parse_sentinel(url: str) -> SentinelURL:
    """The parts of a `redis+sentinel://` URL, or ValueError saying what is wrong
    (never quoting the password)."""
    rest = url.partition("://")[2]
    rest, _, query = rest.partition("?")
    if query:
        raise ValueError("takes no query string; the Sentinels' password is its own setting")
    auth, at, hosts_path = rest.rpartition("@")
    if not at:
        auth, hosts_path = "", rest
    hosts, slash, path = hosts_path.partition("/")
    username = password = None
    if auth:
        user, colon, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for host in filter(None, hosts.split(",")):
        if host.startswith("["):  # [IPv6]:port
            name, _, port = host[1:].partition("]")
            port = port.removeprefix(":")
        else:
            name, _, port = host.partition(":")
        if not name:
            raise ValueError(f"has an empty Sentinel host in {hosts!r}")
        try:
            number = int(port) if port else SENTINEL_PORT
        except ValueError:
            raise ValueError(f"has a bad Sentinel port {port!r}") from None
        if not 1 <= number <= 65535:
            raise ValueError(f"has a bad Sentinel port {number}")
        sentinels.append((name, number))
    if not sentinels:
        raise ValueError("names no Sentinel; use redis+sentinel://HOST:26379,HOST:26379/MASTER")
    parts = [p for p in path.split("/") if p] if slash else []
    if not parts:
        raise ValueError(
            "names no master; use redis+sentinel://HOST:26379,.../MASTER_NAME[/DB] with the "
            "name the Sentinels monitor (`sentinel monitor NAME ...`)"
        )
    if len(parts) > 2:
        raise ValueError("has too many path parts; use .../MASTER_NAME[/DB]")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"has a bad database number {parts[1]!r}")
        db = int(parts[1])
    return SentinelURL(tuple(sentinels), unquote(parts[0]), db, username, password)


class Connection:
    """A Redis client for `url`, plus what is needed to ask who the master is."""

    def __init__(
        self,
        url: str,
        *,
        sentinel_password: str = "",
        tls_ca_file: str | None = None,
        **options: Any,
    ) -> None:
        self.url = url
        self.sentinel: Sentinel | None = None
        tls: dict[str, Any] = {}
        if uses_tls(url):
            tls = {"ssl_ca_certs": tls_ca_file} if tls_ca_file else {}
        if is_sentinel(url):
            parts = parse_sentinel(url)
            timeout = min(float(options.get("socket_connect_timeout") or 1.0), 1.0)
            if uses_tls(url):
                tls["ssl"] = True
            self.sentinel = Sentinel(
                list(parts.sentinels),
                sentinel_kwargs={
                    "socket_timeout": timeout,
                    "socket_connect_timeout": timeout,
                    "password": sentinel_password or None,
                    **tls,
                },
            )
            self.master_name = parts.master
            self.client: aioredis.Redis = self.sentinel.master_for(
                parts.master,
                db=parts.db,
                username=parts.username,
                password=parts.password,
                **tls,
                **options,
            )
        else:
            self.master_name = ""
            self.client = aioredis.Redis.from_url(url, **tls, **options)

    async def master_address(self) -> str | None:
        """HOST:PORT of the master Sentinel names now (None for a plain URL)."""
        if self.sentinel is None:
            return None
        host, port = await self.sentinel.discover_master(self.master_name)
        return f"{host}:{port}"

    async def reset(self) -> None:
        """Drop every pooled connection: the next command connects to the master Sentinel
        names now. redis-py asks Sentinel only when it opens a connection, and a master
        demoted by `SENTINEL FAILOVER` may go on accepting writes for seconds."""
        pool = self.client.connection_pool
        # Idle connections now; those in use at this moment when they come back to the
        # pool (closing them under a command would break it).
        mark_in_use = getattr(pool, "update_active_connections_for_reconnect", None)
        if mark_in_use is not None:
            await mark_in_use()
        else:  # an older redis-py has no public way: its pool's own set
            for connection in list(getattr(pool, "_in_use_connections", ())):
                connection.mark_for_reconnect()
        await pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        await self.client.aclose()
        if self.sentinel is not None:
            for sentinel in self.sentinel.sentinels:
                await sentinel.aclose()

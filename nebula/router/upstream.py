"""The router's HTTP client for engines: kept-alive connections, one write per request.

aiohttp's client builds a request object, a URL, headers, timers, a response
object and a stream reader per request: with a 2 kB chat it cost the router
more than everything else it does (bench/router.py, `--profile`). Engines are
one kind of server, asked one kind of request (a POST with a JSON body), so
this client does only that: the request's head is bytes prepared per replica,
written with the body in one call; the response is read by `http1`, straight
from the connection's protocol, into the `Response` the router reads or
relays.

Errors, in the router's terms:
- `Unreachable`: no answer began (connect refused or timed out, the connection
  closed before a whole head): nothing reached the client, so another replica
  may be tried. A kept-alive connection that the engine closed while idle is
  replaced by a new one first, once.
- `ReadTimeout`: the engine sent nothing for the timeout.
- `Broken`: the answer broke off after it began.

A `Response` that is not read to its end is closed, never reused: closing the
connection is how an engine learns that the client left (vLLM then aborts the
request).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

from nebula.router.http1 import BadResponse, Head, ResponseParser

IDLE_PER_ORIGIN = 256  # kept-alive connections per engine, at most
ORIGINS = 4096  # engines' parsed URLs kept
HIGH_WATER = 256 * 1024  # body bytes buffered before the engine is asked to wait


class Unreachable(Exception):
    """No answer began: the request may go to another replica."""


class ReadTimeout(Exception):
    """The engine sent nothing for the timeout."""


class Broken(Exception):
    """The answer broke off after it began."""


class Origin:
    """An engine's address, parsed once: where to connect, what its requests start
    with, and its kept-alive connections."""

    __slots__ = ("host", "host_header", "idle", "port", "prefix", "tls")

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an engine URL: {base!r}")
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.host = parts.hostname
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = f"Host: {shown}:{self.port}\r\n".encode()
        self.prefix = parts.path.rstrip("/").encode()  # the base URL's own path, if any
        self.idle: list[Connection] = []  # newest last


class Connection(asyncio.Protocol):
    """One connection to an engine, and the response being read on it."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser = ResponseParser(self)
        self.head: Head | None = None
        self.complete = False
        self.started = False  # a byte of the response arrived
        self.error: Exception | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None

    # asyncio's side.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport's subclasses, but do the same.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self.parser.feed(data)
        except BadResponse as exc:
            self._fail(Broken(str(exc)) if self.head is not None else Unreachable(str(exc)))
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self.origin.idle:
            self.origin.idle.remove(self)
        if not self.complete and self.error is None:
            try:
                self.parser.eof()
            except BadResponse as bad:
                why = f"{bad} ({type(exc).__name__})" if exc is not None else str(bad)
                self._fail(Broken(why) if self.head is not None else Unreachable(why))
        self._wake()

    # The parser's side.

    def on_head(self, head: Head) -> None:
        self.head = head

    def on_body(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()  # the engine waits until the relay catches up

    def on_end(self) -> None:
        self.complete = True

    # The router's side.

    def send(self, head: bytes, body: bytes) -> None:
        """Start a request on this (idle) connection."""
        assert self.transport is not None
        self.parser = ResponseParser(self)
        self.head, self.complete, self.started, self.error = None, False, False, None
        self.transport.writelines((head, body))

    def take(self) -> bytes:
        """The body bytes buffered so far."""
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def progress(self, timeout: float) -> None:
        """Until something arrives (or the connection ends); ReadTimeout after `timeout`
        seconds of nothing."""
        if self.error is not None:
            raise self.error
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._time_out, waiter, timeout)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self.error is not None:
            raise self.error

    def _time_out(self, waiter: asyncio.Future[None], timeout: float) -> None:
        if not waiter.done():
            waiter.set_exception(ReadTimeout(f"nothing for {timeout:g}s"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error

    @property
    def reusable(self) -> bool:
        head = self.head
        return (
            self.complete
            and not self.closed
            and head is not None
            and head.keep_alive
            and not self.parser.extra
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """An engine's answer: its status and headers, then its body, read whole or relayed."""

    __slots__ = ("_conn", "_pool", "headers", "origin", "status")

    def __init__(self, conn: Connection, pool: Upstream) -> None:
        assert conn.head is not None
        self._conn, self._pool = conn, pool
        self.status = conn.head.status
        self.headers = conn.head.headers  # names in lower case
        self.origin = conn.origin

    async def read(self, timeout: float) -> bytes:
        """The whole body; ReadTimeout when the engine pauses longer than `timeout`."""
        conn = self._conn
        parts = []
        while not conn.complete:
            if conn.chunks:
                parts.append(conn.take())  # taken as it comes: reading never pauses here
            elif conn.closed and conn.error is None:
                raise Broken("the connection closed before the response's end")
            else:
                await conn.progress(timeout)
        parts.append(conn.take())
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self, timeout: float) -> AsyncIterator[bytes]:
        """The body as it arrives, whatever is there at each step."""
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                return
            elif conn.closed and conn.error is None:
                raise Broken("the connection closed before the response's end")
            else:
                await conn.progress(timeout)

    def release(self) -> None:
        """Done with it: the connection goes back to the pool if the answer was read to
        its end, else it is closed."""
        self._pool.put(self._conn)

    def close(self) -> None:
        self._conn.close()


class Upstream:
    """Connections to engines, kept alive per engine, and the requests sent on them."""

    def __init__(self, connect_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._origins: dict[str, Origin] = {}
        self._tls: ssl.SSLContext | None = None

    def origin(self, base: str) -> Origin:
        origin = self._origins.get(base)
        if origin is None:
            if len(self._origins) >= ORIGINS:
                self._origins.clear()  # replicas come and go: bounded
            origin = self._origins[base] = Origin(base)
        return origin

    async def post(
        self, base: str, path: str, headers: bytes, body: bytes, timeout: float
    ) -> Response:
        """POST `body` to `base` + `path`; the response once its head has arrived.
        `headers`: whole header lines, CRLF-ended (Host and Content-Length are added)."""
        origin = self.origin(base)
        head = b"".join(
            (
                b"POST ",
                origin.prefix,
                path.encode(),
                b" HTTP/1.1\r\n",
                origin.host_header,
                headers,
                b"Content-Length: %d\r\n\r\n" % len(body),
            )
        )
        idle = origin.idle
        while idle:  # a kept-alive connection first: the newest, the likeliest open
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                try:
                    return await self._exchange(conn, head, body, timeout)
                except Unreachable:
                    if conn.started:
                        raise
                    # Closed by the engine while idle (its keep-alive ran out): a new one.
        return await self._exchange(await self._connect(origin), head, body, timeout)

    async def _exchange(
        self, conn: Connection, head: bytes, body: bytes, timeout: float
    ) -> Response:
        try:
            conn.send(head, body)
            while conn.head is None:
                if conn.closed and conn.error is None:
                    raise Unreachable("the connection closed before an answer")
                await conn.progress(timeout)
        except BaseException:
            conn.close()  # cancelled (the client left) or failed: the engine sees it go
            raise
        return Response(conn, self)

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.tls else None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(origin),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise Unreachable(f"connect timed out after {self.connect_timeout_s:g}s") from None
        except OSError as exc:
            raise Unreachable(f"connect failed ({type(exc).__name__})") from None
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def put(self, conn: Connection) -> None:
        idle = conn.origin.idle
        if conn.reusable and len(idle) < IDLE_PER_ORIGIN:
            idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        for origin in self._origins.values():
            for conn in list(origin.idle):
                conn.close()

"""The router's client for engines (router/upstream.py) against a real aiohttp server
over loopback: connections kept alive and replaced when the engine closed them,
timeouts, answers that break off, big bodies, and a client that leaves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from nebula.router.upstream import Broken, ReadTimeout, Unreachable, Upstream

JSON = b"Content-Type: application/json\r\n"
BIG = b'{"data": "' + b"x" * 2_000_000 + b'"}'


class Engine:
    """An aiohttp server that records each request's client port and how streams end."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.stream_ended: asyncio.Event = asyncio.Event()
        self.stream_error: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/echo", self.echo)
        app.router.add_post("/once-per-connection", self.once_per_connection)
        app.router.add_post("/slow", self.slow)
        app.router.add_post("/big", self.big)
        app.router.add_post("/stream", self.stream)
        app.router.add_post("/cut", self.cut)
        return app

    def _seen(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.ports.append(peer[1] if peer else -1)

    async def echo(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=await request.read(), content_type="application/json")

    async def once_per_connection(self, request: web.Request) -> web.Response:
        """Close, unanswered, a connection that already carried a request."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer and peer[1] in self.ports:
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPBadRequest()  # never sent: the connection is gone
        return await self.echo(request)

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(text="late")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=BIG, content_type="application/json")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(100):  # 5 s at most
                await response.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError) as exc:
            self.stream_error = type(exc).__name__
            self.stream_ended.set()
            raise
        self.stream_ended.set()
        return response

    async def cut(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()  # the engine dies mid-answer
        return response


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, str]]:
    server = Engine()
    runner = web.AppRunner(server.app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[Upstream]:
    upstream = Upstream(connect_timeout_s=2)
    try:
        yield upstream
    finally:
        await upstream.close()


async def test_a_connection_is_kept_alive_and_replaced_once_the_engine_closed_it(
    engine: tuple[Engine, str], client: Upstream
) -> None:
    server, url = engine
    for body in (b'{"a": 1}', b'{"a": 2}'):
        answer = await client.post(url, "/echo", JSON, body, 5)
        assert answer.status == 200 and await answer.read(5) == body
        answer.release()
    assert server.ports[0] == server.ports[1], "the second request reused the connection"
    # The engine closes that kept-alive connection as the next request arrives on it
    # (its keep-alive ran out): nothing was answered, so a new connection carries it.
    answer = await client.post(url, "/once-per-connection", JSON, b'{"a": 3}', 5)
    assert await answer.read(5) == b'{"a": 3}'
    answer.release()
    assert server.ports[-1] != server.ports[0]


async def test_an_engine_that_sends_nothing_times_out_and_its_connection_is_dropped(
    engine: tuple[Engine, str], client: Upstream
) -> None:
    _, url = engine
    started = time.monotonic()
    with pytest.raises(ReadTimeout):
        await client.post(url, "/slow", JSON, b"{}", 0.3)
    assert time.monotonic() - started < 2.5
    assert not client.origin(url).idle


async def test_nothing_listening_is_unreachable(client: Upstream) -> None:
    with pytest.raises(Unreachable, match="connect failed"):
        await client.post("http://127.0.0.1:9", "/echo", JSON, b"{}", 1)


async def test_a_big_answer_arrives_whole(engine: tuple[Engine, str], client: Upstream) -> None:
    _, url = engine
    answer = await client.post(url, "/big", JSON, b"{}", 5)
    assert await answer.read(5) == BIG
    answer.release()
    assert len(client.origin(url).idle) == 1


async def test_an_answer_that_breaks_off_is_broken(
    engine: tuple[Engine, str], client: Upstream
) -> None:
    _, url = engine
    answer = await client.post(url, "/cut", JSON, b"{}", 5)
    got = b""
    with pytest.raises(Broken):
        async for chunk in answer.chunks(5):
            got += chunk
    assert got.startswith(b"data: 1")
    answer.release()
    assert not client.origin(url).idle


async def test_a_stream_left_halfway_is_closed_and_the_engine_sees_it(
    engine: tuple[Engine, str], client: Upstream
) -> None:
    server, url = engine
    answer = await client.post(url, "/stream", JSON, b"{}", 5)

    async def read_some() -> None:
        async for _ in answer.chunks(5):
            pass

    reading = asyncio.create_task(read_some())
    await asyncio.sleep(0.3)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    answer.close()  # what the router does when its client leaves
    await asyncio.wait_for(server.stream_ended.wait(), 4.0)
    assert server.stream_error, "the engine's stream was cut, not finished"
    assert not client.origin(url).idle

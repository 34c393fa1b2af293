"""A bare aiohttp proxy (uvloop, SO_REUSEPORT), the baseline for bench/router.py.

It does only what any proxy must: read the body, send it on, return the answer.
No keys, no model lookup, no metrics, no retries. Nebula's router is compared
with it and with the upstream directly, on the same machine in the same run.

    python -m bench.bare_proxy UPSTREAM_URL PORT
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


async def handle(request: web.Request) -> web.Response:
    body = await request.read()
    async with request.app[SESSION].post(
        UPSTREAM + request.raw_path, data=body, headers={"Content-Type": "application/json"}
    ) as r:
        data = await r.read()
        return web.Response(status=r.status, body=data, content_type="application/json")


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", handle)

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    await web.SockSite(runner, sock).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    UPSTREAM = sys.argv[1]
    uvloop.run(main(int(sys.argv[2])))

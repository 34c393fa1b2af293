"""Requests that never reach a route: what the router answers and what it logs.

aiohttp answers a malformed HTTP message (a bad header, a request line too
long) itself, with a plain-text page, and logs "Error handling request" with
the exception, whose text quotes the raw bytes: an `Authorization` header
included. Any client can send one, as often as it likes.

So the router's HTTP server gets its own logger, whose filter keeps the kind
of error and drops its text and traceback, and logs one line per interval at
most (with a count of the ones left out); and its own request handler, which
answers those errors in OpenAI's shape like every other error.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from nebula.router.openai_errors import error_body

LOG_INTERVAL_S = 10.0


class QuietFilter(logging.Filter):
    """No exception text from aiohttp's server in the logs; one line per interval at most."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last = -interval_s
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False  # aiohttp's debug lines quote requests too
        exc = record.exc_info[1] if record.exc_info else None
        kind = type(exc).__name__ if exc is not None else "error"
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._dropped += 1
            return False
        self._last = now
        dropped, self._dropped = self._dropped, 0
        if isinstance(exc, HttpProcessingError):
            what = "malformed HTTP request"
        else:
            what = "request failed in the router"
        record.msg = "%s (%s; details withheld, they may quote client headers)%s"
        record.args = (what, kind, f"; {dropped} more since the last such line" if dropped else "")
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def server_logger() -> logging.Logger:
    logger = logging.getLogger("nebula.router.http")
    if not any(isinstance(f, QuietFilter) for f in logger.filters):
        logger.addFilter(QuietFilter())
    return logger


class OpenAIErrorHandler(RequestHandler):
    """aiohttp's connection handler, with its error pages in OpenAI's shape."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        self.log_exception("Error handling request", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; cannot send an error page")
        if isinstance(exc, HttpProcessingError):
            text = f"malformed HTTP request ({type(exc).__name__})"
        else:
            text = "the router failed to handle the request"
        body = json.dumps(error_body(status, text, "bad_http" if status < 500 else "internal"))
        resp = web.Response(status=status, text=body, content_type="application/json")
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return OpenAIErrorHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An AppRunner whose connections use `OpenAIErrorHandler` and the quiet logger."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, logger=server_logger(), **kwargs)

    async def _make_server(self) -> web.Server:
        # aiohttp has no public way to choose the connection handler's class, so this
        # leans on AppRunner._make_server and Server's own attributes (aiohttp 3.9 to
        # 3.14). What it buys is pinned by behaviour, not by version: a malformed
        # request must get an OpenAI-shaped 400 with code `bad_http`
        # (tests/security/test_router_edges.py), so an aiohttp that changes these
        # internals fails that test before it ships.
        server = await super()._make_server()
        server.__class__ = _Server  # same object, with our handler class
        return server

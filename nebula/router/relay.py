"""Passing a streamed answer back as it arrives, and ending it honestly.

The first chunk commits the router to the replica: from then on a failure cannot
be retried, so the stream ends with an error event that says why (never a fake
`[DONE]`): the replica broke off, an unload's drain ran out under it, or the
router itself was stopped past its drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from nebula.router import router_metrics
from nebula.router.accounting import Account
from nebula.router.openai_errors import stream_error_event
from nebula.router.table import RoutingTable
from nebula.router.upstream import Broken, ReadTimeout, Response

log = logging.getLogger(__name__)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class Streams:
    """Relays streamed answers, and knows which are running, so that a stopping
    router can end them itself with an event that says why, rather than have
    aiohttp drop the connections."""

    def __init__(self, table: RoutingTable, idle_read_timeout_s: float) -> None:
        self.table = table
        self.idle_read_timeout_s = idle_read_timeout_s
        self.active: set[Response] = set()
        self.stopped = False

    def stop_all(self) -> None:
        """The router's drain is over: cut every stream still running."""
        self.stopped = True
        if self.active:
            log.warning("the drain is over: cutting %d stream(s) still running", len(self.active))
        for upstream in list(self.active):
            upstream.close()

    async def relay(
        self,
        request: web.Request,
        upstream: Response,
        headers: dict[str, str],
        model: str,
        *,
        started: float,
        ttft: Any,
        account: Account,
        response: web.StreamResponse | None = None,
    ) -> web.StreamResponse:
        """Pass a stream back chunk by chunk; `response`: the stream already answering
        the client (a held request), else one is opened here. The usage chunk is read
        (and removed when the client did not ask for it), and the answer's tokens
        counted before the stream's end reaches the client."""
        if response is None:
            response = web.StreamResponse(status=upstream.status, headers=headers)
            await response.prepare(request)
        first = True
        tap = account.tap()
        self.active.add(upstream)
        try:
            # The idle timeout applies between chunks.
            async for chunk in upstream.chunks(self.idle_read_timeout_s):
                if first:
                    ttft.observe(time.perf_counter() - started)
                    first = False
                passed = tap.feed(chunk)
                if tap.final and not account.settled:
                    await account.settle(tap.tokens)
                if passed:
                    await response.write(passed)
        except asyncio.CancelledError:  # the client left
            account.cut_short(tap.events)
            raise
        except (Broken, ReadTimeout) as exc:
            account.cut_short(tap.events)
            if _client_gone(request):
                # Nobody to tell: drop the engine's connection so that it stops too.
                upstream.close()
                return response
            await response.write(self._why_it_ended(exc, model, upstream))
        else:
            rest = tap.flush()
            await account.settle(tap.tokens)
            if rest:
                await response.write(rest)
        finally:
            self.active.discard(upstream)
        await response.write_eof()
        return response

    def _why_it_ended(self, exc: BaseException, model: str, upstream: Response) -> bytes:
        if self.stopped:
            return stream_error_event(
                "the router stopped (router_drain_s ran out) before this answer was "
                "complete; send it again",
                "router_stopped",
            )
        router_metrics.UPSTREAM_ERRORS.labels(model, "broken_stream").inc()
        reason = type(exc).__name__
        log.warning("stream from %s broke: %s (%s)", upstream.origin.host, reason, exc)
        if model in self.table.unloading:  # as the table is now, not when the stream began
            # The unload's drain timeout stopped the engine under this stream.
            return stream_error_event(
                f"model {model!r} was unloaded and its drain timeout ended this answer "
                "before it was complete",
                "model_unloaded",
            )
        return stream_error_event(
            f"the replica's stream broke off ({reason}); the answer is incomplete",
            "upstream_broken",
        )

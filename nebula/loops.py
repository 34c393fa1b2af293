"""Running a daemon's background loops: the one shape of a reconcile loop, and the
one shape of a periodic chore.

Every loop is a named task. The first one to end (by error or by returning)
stops the rest: a daemon with a dead loop must die loudly rather than limp on.
SIGINT and SIGTERM stop every loop gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from nebula.errors import NebulaError
from nebula.process import STOP_STEP_S, bounded, stop_signal, wait_event

if TYPE_CHECKING:
    from nebula.store.core import Core

log = logging.getLogger(__name__)
LISTENER_STOP_S = 1.0


def jittered(seconds: float, spread: float = 0.1) -> float:
    """`seconds` give or take `spread` of it, so a fleet does not tick in step."""
    return seconds * (1 + random.uniform(-spread, spread))


async def run_loops(loops: dict[str, Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """Run named loops until a signal or until one of them ends, then stop the rest."""
    async with stop_signal() as stop:
        tasks: dict[asyncio.Task[Any], str] = {
            asyncio.create_task(fn(), name=name): name for name, fn in loops.items()
        }
        stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait(), name="signal")
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*tasks, stopper]:
                task.cancel()
            await bounded(
                "stopping the loops",
                asyncio.gather(*tasks, stopper, return_exceptions=True),
                STOP_STEP_S,
            )
    for task in done:
        if task is stopper:
            log.info("stopping on signal")
            continue
        exc = task.exception()
        if exc is not None:
            log.error("loop %s died: %s", tasks[task], exc)
            raise exc
        log.error("loop %s ended", tasks[task])


async def every(
    name: str, seconds: float | Callable[[], float], chore: Callable[[], Awaitable[object]]
) -> None:
    """Run `chore` every `seconds`, forever: the one shape of a daemon's periodic
    chores (samples, reports, flushes, advertisements), which never end its loop.

    A `NebulaError` (Redis away) is logged at debug level: the next round tries
    again, and the component that depends on it says so itself. Anything else is
    a bug in one round: logged with its traceback, and the next round goes on.
    `seconds` may be a function, asked before each wait (a jittered interval)."""
    while True:
        try:
            await chore()
        except NebulaError as exc:
            log.debug("%s: %s", name, exc.message)
        except Exception:
            log.exception("%s failed; retrying", name)
        await asyncio.sleep(seconds() if callable(seconds) else seconds)


async def reconcile_forever(
    name: str,
    step: Callable[[], Awaitable[object]],
    *,
    wake: asyncio.Event,
    interval: Callable[[], float],
    on_error: Callable[[NebulaError], None],
    listen: tuple[Core, str] | None = None,
    on_bug: Callable[[], None] | None = None,
) -> None:
    """Run `step` again and again: at once when `wake` is set, else every `interval()`.

    Level-triggered: `step` works out what to do from the current state, so a
    wake-up that is lost (Redis away, a dropped subscription) costs latency only.
    `listen` (a store and a channel) sets `wake` on every message there.
    A `NebulaError` (Redis away, supervisord away) goes to `on_error`; anything
    else is a bug in one pass: it is logged with its traceback, `on_bug` runs
    (to start over from a full read, say), and the next pass goes on.
    """
    listener = None
    if listen is not None:
        core, channel = listen
        listener = asyncio.create_task(
            core.wake_on(wake, channel, interval()), name=f"{name}-events"
        )
    try:
        while True:
            wake.clear()
            try:
                await step()
            except NebulaError as exc:
                on_error(exc)
            except Exception:
                log.exception("%s failed; retrying", name)
                if on_bug is not None:
                    on_bug()
            await wait_event(wake, interval())
    finally:
        if listener is not None:
            listener.cancel()
            # Bounded: a subscription over TLS can take long to close (the peer's
            # goodbye), and a stopping process must not wait for it.
            await asyncio.wait({listener}, timeout=LISTENER_STOP_S)

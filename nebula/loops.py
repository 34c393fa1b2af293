"""Running a daemon's background loops.

Every loop is a named task. The first one to end (by error or by returning)
stops the rest: a daemon with a dead loop must die loudly rather than limp on.
SIGINT and SIGTERM stop every loop gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def jittered(seconds: float, spread: float = 0.1) -> float:
    """`seconds` give or take `spread` of it, so a fleet does not tick in step."""
    return seconds * (1 + random.uniform(-spread, spread))


async def run_loops(loops: dict[str, Callable[[], Awaitable[None]]]) -> None:
    """Run named loops until a signal or until one of them ends, then stop the rest."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = {asyncio.create_task(fn(), name=name): name for name, fn in loops.items()}
    stopper = asyncio.create_task(stop.wait(), name="signal")
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for task in [*tasks, stopper]:
            task.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)
    for task in done:
        if task is stopper:
            log.info("stopping on signal")
            continue
        exc = task.exception()
        if exc is not None:
            log.error("loop %s died: %s", tasks[task], exc)
            raise exc
        log.error("loop %s ended", tasks[task])

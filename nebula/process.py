"""What every Nebula process does the same way: its event loop, its signals, and
dying with its parent.

One place for signal handling: a daemon's loops, a router worker and the router's
worker supervisor all stop on the first SIGINT or SIGTERM through `stop_signal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_async(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` on uvloop where it is installed."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(coro)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # optional off Linux
        return None
    return uvloop.new_event_loop


@contextlib.asynccontextmanager
async def stop_signal() -> AsyncIterator[asyncio.Event]:
    """An event set by the first SIGINT or SIGTERM, while the context lasts."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def die_with_parent(
    sig: int = signal.SIGTERM, *, parent: int | None = None, exit_code: int = 1
) -> None:
    """Linux: get `sig` when the parent process dies; exit now if it already has.

    `parent` is the pid the parent had when it started us (default: the current
    parent). Compared with that pid, never with 1: as PID 1 in a container the
    parent *is* 1, and a process that checked for 1 would exit at once.
    """
    expected = os.getppid() if parent is None else parent
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, sig)
    except OSError:  # not Linux: the parent's own shutdown still stops us
        return
    # The parent may have died before prctl(): then no signal comes.
    if os.getppid() != expected:
        sys.exit(exit_code)

"""What every Nebula process does the same way: its event loop, its signals, and
dying with its parent.

One place for signal handling: a daemon's loops, a router worker and the router's
worker supervisor all stop on the first SIGINT or SIGTERM through `stop_signal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The bound on one shutdown step (cancelling loops, closing connections): well
# under the 10 s a process manager commonly waits after SIGTERM before it kills.
STOP_STEP_S = 5.0

log = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    """One line per record on stderr, for every Nebula process (router workers too:
    a spawned worker starts with no logging of its own)."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to `timeout` for `event`; True if it was set.

    Never `asyncio.wait_for(event.wait(), timeout)` on Python 3.11: when the event
    is set in the same loop turn as the task is cancelled, that returns normally
    and the cancellation is lost, so a loop around it never stops (a router that
    needed a SIGKILL in CI; tests/test_shutdown.py shows it).
    """
    try:
        async with asyncio.timeout(timeout):
            return await event.wait()
    except TimeoutError:
        return False


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


async def bounded(what: str, step: Awaitable[object], seconds: float) -> None:
    """Await a shutdown `step` for at most `seconds`.

    A process asked to stop must stop: whoever stops it (supervisord, a test) kills
    it after a while, and then nobody learns why. Past the bound, where every task
    still waits is logged and the step is cancelled; the thread stacks go to stderr
    a second later (a loop blocked in a synchronous call shows only there). A step
    that goes on even once cancelled ends the process here: closing the event loop
    would wait for it too.
    """
    task = asyncio.ensure_future(step)
    faulthandler.dump_traceback_later(seconds + 1.0, exit=False)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    finally:
        faulthandler.cancel_dump_traceback_later()
    if done:
        task.result()  # its error, if it failed
        return
    log.error(
        "%s took over %gs; stopping anyway. Still running:\n%s", what, seconds, running_tasks()
    )
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    if not task.done():
        log.error("%s would not stop when cancelled; exiting now", what)
        logging.shutdown()
        os._exit(0)  # asked to stop, and stopped: not a crash for supervisord


def running_tasks() -> str:
    """Every task of this loop but the caller's, each with the chain it awaits."""
    me = asyncio.current_task()
    out = []
    for task in asyncio.all_tasks():
        if task is me or task.done():
            continue
        chain: list[str] = []
        coro: Any = task.get_coro()
        while coro is not None and len(chain) < 12:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                chain.append(
                    f"{frame.f_code.co_name} "
                    f"({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
                )
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        out.append(f"  {task.get_name()}: {' -> '.join(chain) or 'not started'}")
    return "\n".join(out) or "  (no task)"

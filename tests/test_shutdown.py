"""A process asked to stop stops, even when part of its shutdown hangs: the hang is
cut short and explained in the log instead of ending in a SIGKILL that says nothing.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap

import pytest

from nebula.loops import reconcile_forever
from nebula.process import bounded, wait_event


async def test_a_loop_cancelled_in_the_turn_it_is_woken_stops() -> None:
    # What kept a router from stopping in CI: on Python 3.11, `asyncio.wait_for(
    # event.wait(), t)` returns normally when the event is set in the same loop turn
    # as the task is cancelled; the loop around it went on forever.
    wake = asyncio.Event()
    passes = 0

    async def step() -> None:
        nonlocal passes
        passes += 1

    task = asyncio.create_task(
        reconcile_forever(
            "test loop", step, wake=wake, interval=lambda: 60.0, on_error=lambda exc: None
        )
    )
    await asyncio.sleep(0.05)  # it waits for a wake-up now
    wake.set()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=10)
    assert done, f"the cancellation was lost: the loop went on ({passes} passes)"
    assert task.cancelled()


async def test_wait_event_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.05) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 10) is True


async def waits_forever() -> None:
    await asyncio.Event().wait()


async def test_a_hung_step_is_cut_and_where_it_waits_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    step = asyncio.ensure_future(waits_forever())
    with caplog.at_level(logging.ERROR, logger="nebula.process"):
        await asyncio.wait_for(bounded("stopping the test", step, 0.2), 10)
    assert step.cancelled()
    [record] = caplog.records
    assert "stopping the test took over 0.2s; stopping anyway" in record.getMessage()
    # The task and the chain it awaits, down to the function that hangs.
    assert "waits_forever (test_shutdown.py:" in record.getMessage()


async def test_a_step_that_finishes_in_time_is_awaited_and_its_error_raised() -> None:
    done: list[str] = []

    async def quick() -> None:
        await asyncio.sleep(0.01)
        done.append("yes")

    await bounded("quick", quick(), 10)
    assert done == ["yes"]

    async def fails() -> None:
        raise ValueError("broken cleanup")

    with pytest.raises(ValueError, match="broken cleanup"):
        await bounded("failing", fails(), 10)


def test_a_step_that_ignores_cancellation_ends_the_process() -> None:
    # Closing the event loop would wait for such a task forever: the process exits
    # from `bounded` itself, status 0 (it was asked to stop, and it stopped).
    script = textwrap.dedent(
        """
        import asyncio, logging
        from nebula.process import bounded, run_async

        async def stubborn():
            while True:
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    pass

        async def main():
            await bounded("stubborn cleanup", stubborn(), 0.2)
            print("not reached")

        logging.basicConfig(level=logging.INFO)
        run_async(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "not reached" not in done.stdout
    assert "stubborn cleanup would not stop when cancelled; exiting now" in done.stderr
    assert "stubborn (<string>:" in done.stderr

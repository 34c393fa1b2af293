"""Nebula's own overhead on load and unload, with the test engine (run by hand).

    .venv/bin/python -m bench.lifecycle [--rounds 5]

Starts Redis, the scheduler and one node (supervisord and agent) with default
intervals, then loads and unloads a test-engine model several times. The
engine's own start-up (process start to its first healthy answer, measured
alone) is subtracted from load -> Ready to give Nebula's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness.cluster import Cluster, wait_for
from harness.processes import RedisServer, free_port, spawn, stop
from nebula.models import Status
from nebula.store import State

DEFAULTS = {
    # The defaults an operator gets, not the tests' fast intervals.
    "NEBULA_HEARTBEAT_INTERVAL_S": "2",
    "NEBULA_NODE_TTL_S": "8",
    "NEBULA_SCHEDULER_INTERVAL_S": "2",
    "NEBULA_LEADER_TTL_S": "6",
    "NEBULA_PROBE_INTERVAL_S": "1",
    "NEBULA_ROUTING_REFRESH_S": "1",
}


def engine_startup(folder: Path) -> float:
    """Process start to first healthy answer, for the test engine alone."""
    port = free_port()
    start = time.monotonic()
    proc = spawn(
        [sys.executable, "-m", "nebula.testengine", "--port", str(port), "--model", "m"],
        folder / "engine-alone.log",
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    return time.monotonic() - start
            except OSError:
                time.sleep(0.005)
    finally:
        stop(proc)


async def rounds(url: str, folder: Path, n: int) -> tuple[list[float], list[float]]:
    cluster = Cluster(url, folder, extra_env=DEFAULTS)
    state = State(url)
    try:

        async def node_up() -> bool:
            return bool(await state.nodes.live()) and bool(await state.lease.holder())

        await wait_for(node_up, 30, "the node and the scheduler")
        loads, unloads = [], []
        for _ in range(n):
            start = time.monotonic()
            request = await cluster.load(state, "tiny_chat")
            await cluster.status(state, request.id, Status.READY)
            loads.append(time.monotonic() - start)
            start = time.monotonic()
            await state.requests.delete(request.id)
            await cluster.gone(state, request.id)
            unloads.append(time.monotonic() - start)
        return loads, unloads
    finally:
        await state.close()
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        alone = statistics.median(engine_startup(tmp) for _ in range(5))
        redis = RedisServer(tmp / "redis")
        redis.start()
        try:
            loads, unloads = asyncio.run(rounds(redis.url, tmp, args.rounds))
        finally:
            redis.stop()
    load = statistics.median(loads)
    print(f"test engine alone, start -> healthy ........ {alone:6.2f} s (median of 5)")
    print(f"load -> Ready through Nebula ............... {load:6.2f} s (median of {args.rounds})")
    print(f"Nebula's overhead on load .................. {load - alone:6.2f} s")
    print(f"unload -> gone (engine idle) ............... {statistics.median(unloads):6.2f} s")


if __name__ == "__main__":
    main()

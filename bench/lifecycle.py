"""Nebula's own overhead on load and unload, with the test engine (run by hand).

    .venv/bin/python -m bench.lifecycle [--rounds 5]

Starts Redis, the scheduler and one node (supervisord and agent) with default
intervals, then loads and unloads a test-engine model several times. The
engine's own start-up (process start to its first healthy answer, measured
alone) is subtracted from load -> Ready to give Nebula's overhead.

Then load on demand, through a router: a streamed request for the model while
nothing is loaded, held until the engine serves. Measured per round: request
-> first byte (less the engine's own start: Nebula's added time); the engine's
first healthy answer (polled every 2 ms on its port) -> first byte; and the
agent's "endpoints" announcement (Ready, on pub/sub) -> first byte.
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

import aiohttp

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
            await state.requests.unload(request.id)
            await cluster.gone(state, request.id)
            unloads.append(time.monotonic() - start)
        return loads, unloads
    finally:
        await state.close()
        cluster.close()


async def on_demand_rounds(url: str, folder: Path, n: int) -> dict[str, list[float]]:
    (folder / "od").mkdir(exist_ok=True)
    cluster = Cluster(url, folder / "od", extra_env={**DEFAULTS, "NEBULA_ON_DEMAND": "true"})
    router = cluster.start_router()
    state = State(url)
    out: dict[str, list[float]] = {"first_byte": [], "after_healthy": [], "after_ready": []}
    try:

        async def node_up() -> bool:
            return bool(await state.nodes.live()) and bool(await state.lease.holder())

        await wait_for(node_up, 30, "the node and the scheduler")
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                times = await one_on_demand(session, state, router.url)
                for name, value in times.items():
                    out[name].append(value)
                [request] = await state.requests.all()
                await state.requests.unload(request.id)
                await cluster.gone(state, request.id)
        return out
    finally:
        await state.close()
        cluster.close()


async def one_on_demand(
    session: aiohttp.ClientSession, state: State, router: str
) -> dict[str, float]:
    marks: dict[str, float] = {}

    async def announced() -> None:
        async with state.subscribe() as pubsub:
            async for message in pubsub.listen():
                if message["data"] == "endpoints":
                    marks["ready"] = time.monotonic()
                    return

    async def healthy() -> None:
        port = None
        while port is None:
            placements = await state.placements.of_node("node-a")
            port = placements[0].port if placements else None
            await asyncio.sleep(0.002)
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as r:
                    if r.status == 200:
                        marks["healthy"] = time.monotonic()
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.002)

    watchers = [asyncio.create_task(announced()), asyncio.create_task(healthy())]
    await asyncio.sleep(0.2)  # subscribed
    body = {"model": "tiny_chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    sent = time.monotonic()
    async with session.post(router + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for _ in r.content.iter_any():
            first = time.monotonic()
            break
        await r.read()
    await asyncio.wait_for(asyncio.gather(*watchers), 10)
    return {
        "first_byte": first - sent,
        "after_healthy": first - marks["healthy"],
        "after_ready": first - marks["ready"],
    }


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
            held = asyncio.run(on_demand_rounds(redis.url, tmp, args.rounds))
        finally:
            redis.stop()
    load = statistics.median(loads)
    print(f"test engine alone, start -> healthy ........ {alone:6.2f} s (median of 5)")
    print(f"load -> Ready through Nebula ............... {load:6.2f} s (median of {args.rounds})")
    print(f"Nebula's overhead on load .................. {load - alone:6.2f} s")
    print(f"unload -> gone (engine idle) ............... {statistics.median(unloads):6.2f} s")
    first = statistics.median(held["first_byte"])
    ms = {k: [v * 1000 for v in vs] for k, vs in held.items()}
    print(f"on demand: request -> first byte ........... {first:6.2f} s (median of {args.rounds})")
    print(f"on demand: Nebula's added time ............. {first - alone:6.2f} s")
    for name, text in (("after_healthy", "engine healthy"), ("after_ready", "Ready (announced)")):
        values = sorted(ms[name])
        print(
            f"held request: {text} -> first byte: median {statistics.median(values):5.1f} ms,"
            f" max {values[-1]:5.1f} ms"
        )


if __name__ == "__main__":
    main()

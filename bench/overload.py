"""Overload: an interactive tenant beside a batch tenant that saturates the model,
with and without flow control, and the replicas that follow the load (run by hand).

    .venv/bin/python -m bench.overload
    .venv/bin/python -m bench.overload --step-s 40 --up-window-s 10

The whole stack on this machine (Redis, scheduler, node agent, router), test
engines that take 4 requests at once (`--max-num-seqs 4`, their own FIFO past
that, as vLLM's) and generate a word every 20 ms; each replica's concurrency
target is 4. Two keys:

    interactive  priority high; a streamed chat every 0.25 s (open loop), 2 words
    batch        priority low; closed-loop clients, non-streamed, 32 words each
                 (0.64 s): 2 of them (0.5x one replica's slots), then a step to
                 20 (5x)

Reported: the interactive tenant's time to its first token (the first `data:`
event, not a keep-alive comment), p50 and p99, unloaded and during the step,
with one fixed replica and flow control off (the engines' FIFO decides) and on;
then, with flow control on and `--replicas 1..3`, the replicas desired and ready
over time and how long after the step the first scale-out came.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from harness.cluster import TEST_CATALOG, Cluster, wait_for
from harness.processes import RedisServer, RouterProcess
from nebula.models import ModelRequest, Status
from nebula.store import State

ADMIN_KEY = "bench-overload-admin"
MODEL = "busy_chat"
SLOTS = 4
CATALOG = (
    TEST_CATALOG
    + f"""
[models.{MODEL}]
model = "test/busy"
engine = "test"
cpu_memory_gib = 1
max_concurrency = {SLOTS}
engine_args = ["--token-ms", "20", "--max-num-seqs", "{SLOTS}"]
"""
)
WORDS = " ".join(f"w{i}" for i in range(40))


async def make_key(session: aiohttp.ClientSession, url: str, name: str, priority: str) -> str:
    async with session.post(
        url + "/admin/keys",
        json={"name": name, "priority": priority},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["key"])


def body(words: int, stream: bool, prompt: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": words,
        "stream": stream,
    }


async def first_token(session: aiohttp.ClientSession, url: str, key: str) -> float | None:
    """Seconds to the first `data:` event of a streamed chat; None if it failed."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(
        url + "/v1/chat/completions", json=body(2, True, "chat: " + WORDS), headers=headers
    ) as r:
        if r.status != 200:
            await r.read()
            return None
        seen = None
        async for line in r.content:
            if seen is None and line.startswith(b"data: {"):
                seen = time.monotonic() - started
        return seen


async def batch_client(
    session: aiohttp.ClientSession, url: str, key: str, until: float, errors: list[int]
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    document = f"document {id(errors)}-{time.monotonic_ns()}: {WORDS}"  # each client its own
    while time.monotonic() < until:
        async with session.post(
            url + "/v1/chat/completions", json=body(32, False, document), headers=headers
        ) as r:
            await r.read()
            if r.status != 200:
                errors.append(r.status)
                await asyncio.sleep(0.5)


async def interactive(
    session: aiohttp.ClientSession, url: str, key: str, until: float, every_s: float
) -> list[float | None]:
    """An open loop: a new request every `every_s`, whatever the others are doing."""
    tasks = []
    while time.monotonic() < until:
        tasks.append(asyncio.create_task(first_token(session, url, key)))
        await asyncio.sleep(every_s)
    return list(await asyncio.gather(*tasks))


async def phase(
    session: aiohttp.ClientSession, url: str, keys: tuple[str, str], batch: int, seconds: float
) -> tuple[list[float], int, list[int]]:
    """`batch` batch clients and the interactive tenant for `seconds`: the interactive
    first-token times, its failures, and the batch's error statuses."""
    until = time.monotonic() + seconds
    errors: list[int] = []
    clients = [batch_client(session, url, keys[1], until, errors) for _ in range(batch)]
    batch_done = asyncio.gather(*clients)
    ttft = await interactive(session, url, keys[0], until, 0.25)
    await batch_done
    ok = [t for t in ttft if t is not None]
    return ok, len(ttft) - len(ok), errors


def quantiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {cuts[49] * 1000:7.1f} ms  p99 {cuts[98] * 1000:7.1f} ms  (n={len(values)})"


async def served(url: str) -> None:
    async def check() -> bool:
        async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
            return r.status == 200

    await wait_for(check, 30, "the router up")


async def with_router(
    cluster: Cluster, flow: bool, part: str, **env: str
) -> tuple[RouterProcess, aiohttp.ClientSession, tuple[str, str]]:
    router = cluster.start_router(
        NEBULA_FLOW_CONTROL="true" if flow else "false", NEBULA_ADMIN_KEY=ADMIN_KEY, **env
    )
    await served(router.url)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
    suffix = f"{part}-{'on' if flow else 'off'}"
    keys = (
        await make_key(session, router.url, f"interactive-{suffix}", "high"),
        await make_key(session, router.url, f"batch-{suffix}", "low"),
    )

    async def known() -> bool:
        return await first_token(session, router.url, keys[0]) is not None

    await wait_for(known, 30, "the keys known and the model served")
    return router, session, keys


async def compare(cluster: Cluster, state: State, args: argparse.Namespace) -> None:
    """One fixed replica: flow control off, then on."""
    request = await state.requests.create(cluster.catalog.get_spec(MODEL), 1)
    await cluster.status(state, request.id, Status.READY, 60)
    print(f"\none replica ({SLOTS} slots); interactive time to first token")
    for flow in (False, True):
        router, session, keys = await with_router(cluster, flow, "compare")
        try:
            alone, _, _ = await phase(session, router.url, keys, 0, args.baseline_s)
            half, _, _ = await phase(session, router.url, keys, SLOTS // 2, args.baseline_s)
            step, failed, errors = await phase(session, router.url, keys, 5 * SLOTS, args.step_s)
        finally:
            await session.close()
            router.stop()
        name = "on " if flow else "off"
        print(f"  flow control {name}  unloaded      {quantiles(alone)}")
        print(f"  flow control {name}  0.5x batch    {quantiles(half)}")
        tail = f"failed {failed}, batch errors {len(errors)}"
        print(f"  flow control {name}  5x batch      {quantiles(step)}  {tail}")
        if flow and alone and len(step) > 1:
            p99 = statistics.quantiles(step, n=100, method="inclusive")[98]
            base = statistics.quantiles(alone, n=100, method="inclusive")[98]
            print(f"  p99 under 5x / unloaded p99: {p99 / base:.2f}x (target: within 2x)")
    await state.requests.unload(request.id)
    await cluster.gone(state, request.id, 60)


async def autoscale(cluster: Cluster, state: State, args: argparse.Namespace) -> None:
    """Flow control on, replicas 1..3: the step, and the replicas that follow."""
    spec = cluster.catalog.get_spec(MODEL)
    request = await state.requests.create(spec, 1, max_replicas=3)
    await cluster.status(state, request.id, Status.READY, 60)
    router, session, keys = await with_router(cluster, True, "autoscale")
    timeline: list[tuple[float, int, int]] = []
    started = time.monotonic()

    async def watch(until: float) -> None:
        while time.monotonic() < until:
            timeline.append((time.monotonic() - started, *await replicas(state, request)))
            await asyncio.sleep(1)

    try:
        total = args.baseline_s + args.step_s + args.cooldown_s
        watcher = asyncio.create_task(watch(started + total))
        await phase(session, router.url, keys, SLOTS // 2, args.baseline_s)
        step_at = time.monotonic() - started
        step, failed, errors = await phase(session, router.url, keys, 5 * SLOTS, args.step_s)
        await phase(session, router.url, keys, 0, args.cooldown_s)
        await watcher
    finally:
        await session.close()
        router.stop()
    print(f"\nreplicas 1..3, up window {args.up_window_s:g}s, down window {args.down_window_s:g}s")
    tail = f"failed {failed}, batch errors {len(errors)}"
    print(f"  interactive during the step: {quantiles(step)}  {tail}")
    print("  t (s)  desired  ready")
    for at, desired, ready in timeline[:: max(1, len(timeline) // 30)]:
        print(f"  {at:5.0f}  {desired:7d}  {ready:5d}")
    out = next((at for at, desired, _ in timeline if at > step_at and desired > 1), None)
    if out is None:
        print("  no scale-out")
    else:
        windows = (out - step_at) / args.up_window_s
        after = f"{out - step_at:.1f}s after the step ({windows:.1f} up windows; target: within 2)"
        print(f"  first scale-out {after}")


async def replicas(state: State, request: ModelRequest) -> tuple[int, int]:
    current = await state.requests.get(request.id)
    endpoints = await state.endpoints.all()
    return current.replicas, sum(1 for e in endpoints if e.model == MODEL)


async def main(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="nebula-bench-overload-"))
    redis = RedisServer(folder / "redis")
    redis.start()
    env = {
        "NEBULA_SCALE_UP_WINDOW_S": str(args.up_window_s),
        "NEBULA_SCALE_DOWN_WINDOW_S": str(args.down_window_s),
        "NEBULA_LOG_LEVEL": "WARNING",
    }
    cluster = Cluster(redis.url, folder, CATALOG, extra_env=env)
    try:
        async with State(redis.url) as state:
            if "compare" in args.parts:
                await compare(cluster, state, args)
            if "autoscale" in args.parts:
                await autoscale(cluster, state, args)
    finally:
        cluster.close()
        redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-s", type=float, default=10, help="unloaded and 0.5x phases")
    parser.add_argument("--step-s", type=float, default=30, help="the 5x phase")
    parser.add_argument("--cooldown-s", type=float, default=45, help="after the step")
    parser.add_argument("--up-window-s", type=float, default=5)
    parser.add_argument("--down-window-s", type=float, default=20)
    parser.add_argument("--parts", default="compare,autoscale")
    asyncio.run(main(parser.parse_args()))

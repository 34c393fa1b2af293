"""Redis's load at cluster scale (run by hand; figures go in the README).

    .venv/bin/python -m bench.scale [--steps 100x1,300x5] [--seconds 15]

Each step (NODESxROUTERS) runs, against one real redis-server, on the
project's own protocol code with default timings:

- simulated agents (`nebula.store`'s heartbeat, placement reads, state reports
  and endpoint writes, exactly as `agent/service.py` calls them), 8 engines
  per node, engines and supervisord replaced by nothing;
- the real scheduler daemon (`nebula scheduler`);
- simulated routers: 4 `RoutingTable`s (router workers) per router, each
  kept fresh by its own `keep_fresh` loop and connection;

spread over a few processes. It reports Redis's CPU (INFO cpu) and ops/s, the
heaviest commands (INFO commandstats), how long a new endpoint and a withdrawn
one take to reach every routing table (p50/p99, 10 of each), the scheduler's
pass time, and a routing table's refresh cost. The agents report how many of
their due probes they managed: on this 2-core machine the big steps cannot be
driven at full rate, and the README extrapolates those from per-call costs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from harness.endpoints import register_address
from harness.processes import RedisServer, free_port, spawn, stop
from nebula.models import Endpoint, ModelSpec, Node, Phase, PlacementState
from nebula.router.table import RoutingTable
from nebula.store import State

ENGINES_PER_NODE = 8
WORKERS_PER_ROUTER = 4
HEARTBEAT_S, PROBE_S, NODE_TTL_S, REFRESH_S = 2.0, 1.0, 8.0, 1.0
MARKER = "bench-marker"


# ------------------------------------------------------------------ agents


async def agent_node(state: State, node: Node, stop_at: float, done: list[int]) -> None:
    published: set[str] = set()
    reported: set[str] = set()
    next_beat = 0.0
    await asyncio.sleep(random.uniform(0, PROBE_S))
    while time.time() < stop_at:
        started = time.time()
        if started >= next_beat:
            await state.nodes.heartbeat(node, NODE_TTL_S)
            next_beat = started + HEARTBEAT_S
        placements = await state.placements.of_node(node.id)
        fresh = {
            p.id: PlacementState(Phase.HEALTHY, pid=1, message="serving", updated_at=started)
            for p in placements
            if p.id not in reported
        }
        if fresh:
            await state.placements.report(node.id, fresh)
            reported.update(fresh)
        for p in placements:
            endpoint = Endpoint(
                p.id,
                p.request_id,
                p.model,
                node.id,
                f"http://{node.address}:{p.port}",
                p.spec.task.value,
            )
            await publish(state, endpoint, announce=p.id not in published)
            published.add(p.id)
        done[0] += 1
        await asyncio.sleep(max(0.0, PROBE_S - (time.time() - started)))


async def publish(state: State, endpoint: Endpoint, *, announce: bool) -> None:
    """The agent's endpoint write, whichever protocol this checkout speaks."""
    await register_address(state, endpoint.node, endpoint.url)
    publish: Any = state.endpoints.publish  # its signature differs between protocols
    try:
        await publish(endpoint, NODE_TTL_S, announce=announce)
    except TypeError:  # the change-feed protocol: written once, not refreshed
        if announce:
            await publish(endpoint)


def agents_main(url: str, nodes: list[str], stop_at: float, out: Any) -> None:
    async def run() -> None:
        # A connection pool per 40 nodes (redis-py's holds 100 connections at most).
        states = [State(url) for _ in range(0, len(nodes), 40)]
        done = [0]
        await asyncio.gather(
            *(agent_node(states[i // 40], cpu_node(n), stop_at, done) for i, n in enumerate(nodes))
        )
        out.put(("agent", done[0]))
        for state in states:
            await state.close()

    asyncio.run(run())


def cpu_node(node_id: str) -> Node:
    i = int(node_id.rsplit("-", 1)[1])
    return Node(
        id=node_id,
        address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
        # Room for exactly 8 engines of 2 GiB under the 0.9 ceiling.
        cpu_count=64,
        ram_total_mib=18 * 1024,
        ram_available_mib=18 * 1024,
        port_min=8100,
        port_max=8199,
        heartbeat_at=time.time(),
    )


# ----------------------------------------------------------------- routers


def routers_main(url: str, tables: int, stop_at: float, window: float, out: Any) -> None:
    async def run() -> None:
        states = [State(url) for _ in range(tables)]
        made = [RoutingTable(merge_after_outage_s=NODE_TTL_S) for _ in range(tables)]
        costs: list[float] = []
        for table in made:
            refresh = table.refresh

            async def timed(state: State, refresh: Any = refresh) -> None:
                started = time.perf_counter()
                await refresh(state)
                if time.time() >= window:  # steady state: the measured window only
                    costs.append(time.perf_counter() - started)

            table.refresh = timed  # type: ignore[method-assign]
        loops = [
            asyncio.create_task(t.keep_fresh(s, REFRESH_S))
            for t, s in zip(made, states, strict=True)
        ]
        # When each table first saw each marker appear and disappear (marker id -> times).
        seen: dict[str, list[float]] = {}
        gone: dict[str, list[float]] = {}
        had: list[set[str]] = [set() for _ in made]
        while time.time() < stop_at:
            now = time.time()
            for i, table in enumerate(made):
                ids = {e.placement_id for e in table.endpoints(MARKER)}
                for pid in ids - had[i]:
                    seen.setdefault(pid, []).append(now)
                for pid in had[i] - ids:
                    gone.setdefault(pid, []).append(now)
                had[i] = ids
            await asyncio.sleep(0.001)
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        extra = sum(getattr(t, "full_reads", 1) - 1 for t in made)  # after each one's first
        out.put(
            (
                "router",
                {
                    "costs": costs,
                    "seen": seen,
                    "gone": gone,
                    "tables": tables,
                    "extra_full_reads": extra,
                },
            )
        )
        for state in states:
            await state.close()

    asyncio.run(run())


# -------------------------------------------------------------------- main


def info(client: redis.Redis, section: str) -> dict[str, Any]:
    return dict(client.info(section))


def command_costs(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[int, float]]:
    out = {}
    for name, stats in after.items():
        if not name.startswith("cmdstat_"):
            continue
        old = before.get(name, {"calls": 0, "usec": 0})
        calls, usec = stats["calls"] - old["calls"], stats["usec"] - old["usec"]
        if calls:
            out[name.removeprefix("cmdstat_")] = (calls, usec)
    return out


def scheduler_pass(port: int) -> tuple[float, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = float(re.search(r"^nebula_scheduler_pass_seconds_sum (\S+)", text, re.M)[1])  # type: ignore[index]
    count = int(float(re.search(r"^nebula_scheduler_pass_seconds_count (\S+)", text, re.M)[1]))  # type: ignore[index]
    return total, count


async def seed(url: str, nodes: int) -> None:
    """Requests for every engine: 8 per node, 4 replicas each."""
    state = State(url)
    for i in range(nodes * ENGINES_PER_NODE // 4):
        spec = ModelSpec(name=f"model-{i:05d}", model="bench/x", cpu_memory_gib=2.0)
        await state.requests.create(spec, 4)
    await state.close()


async def markers(url: str, trials: int) -> list[tuple[str, float, float]]:
    """Publish and withdraw marker endpoints: (id, published at, withdrawn at)."""
    state = State(url)
    out = []
    for i in range(trials):
        pid = f"marker-{i}"
        endpoint = Endpoint(pid, "marker", MARKER, "node-00000", "http://10.9.9.9:1", "chat")
        await asyncio.sleep(0.5)
        up = time.time()
        await publish(state, endpoint, announce=True)
        await asyncio.sleep(1.5)
        down = time.time()
        try:
            await state.endpoints.withdraw(pid, "node-00000")
        except TypeError:  # the protocol before the change feed
            await state.endpoints.withdraw(pid)  # type: ignore[call-arg]
        out.append((pid, up, down))
    await state.close()
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_step(
    redis_server: RedisServer, folder: Path, nodes: int, routers: int, seconds: float
) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    asyncio.run(seed(redis_server.url, nodes))
    port = free_port()
    env = {
        **os.environ,
        "NEBULA_REDIS_URL": redis_server.url,
        "NEBULA_SCHEDULER_METRICS_PORT": str(port),
        "NEBULA_LOG_LEVEL": "WARNING",
    }
    scheduler = spawn(
        [sys.executable, "-m", "nebula.daemons", "scheduler"],
        folder / f"scheduler-{nodes}.log",
        env,
    )
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ids = [f"node-{i:05d}" for i in range(nodes)]
    warm = 25 + nodes / 40
    stop_at = time.time() + warm + seconds + 2
    agent_procs = [
        ctx.Process(target=agents_main, args=(redis_server.url, ids[k::2], stop_at, out))
        for k in range(2)
    ]
    tables = routers * WORKERS_PER_ROUTER
    per = [tables // 2 + (k < tables % 2) for k in range(2)]
    window = stop_at - seconds - 2
    router_procs = [
        ctx.Process(target=routers_main, args=(redis_server.url, n, stop_at, window, out))
        for n in per
        if n
    ]
    for proc in agent_procs + router_procs:
        proc.start()
    try:
        deadline = time.time() + warm
        while time.time() < deadline:
            time.sleep(0.5)
        cpu0, stats0, cmd0 = (
            info(client, "cpu"),
            info(client, "stats"),
            info(client, "commandstats"),
        )
        pass0 = scheduler_pass(port)
        t0 = time.time()
        trials = asyncio.run(markers(redis_server.url, max(1, int(seconds // 2))))
        while time.time() < t0 + seconds:
            time.sleep(0.2)
        wall = time.time() - t0
        cpu1, stats1, cmd1 = (
            info(client, "cpu"),
            info(client, "stats"),
            info(client, "commandstats"),
        )
        pass1 = scheduler_pass(port)
        endpoints_now = client.zcard("nebula:endpoints") or client.hlen("nebula:endpoint-index")
        results = []
        for _ in agent_procs + router_procs:
            try:
                results.append(out.get(timeout=120))
            except queue.Empty:
                results.append(("lost", None))  # a process that died (see its traceback)
    finally:
        for proc in agent_procs + router_procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        stop(scheduler)
    cpu = (
        (cpu1["used_cpu_sys"] + cpu1["used_cpu_user"])
        - (cpu0["used_cpu_sys"] + cpu0["used_cpu_user"])
    ) / wall
    ops = (stats1["total_commands_processed"] - stats0["total_commands_processed"]) / wall
    probes = sum(r for kind, r in results if kind == "agent")
    routed = [r for kind, r in results if kind == "router"]
    costs = [c for r in routed for c in r["costs"]]
    lost = sum(1 for kind, _ in results if kind == "lost")
    extra_full = sum(r.get("extra_full_reads", 0) for r in routed)
    appear: list[float] = []
    vanish: list[float] = []
    for pid, up, down in trials:
        seen = [t for r in routed for t in r["seen"].get(pid, [])]
        gone = [t for r in routed for t in r["gone"].get(pid, [])]
        appear.extend(t - up for t in seen)
        vanish.extend(t - down for t in gone)
        missing = tables - len(gone)
        vanish.extend([float("inf")] * max(0, missing))
    passes = (pass1[0] - pass0[0]) / max(1, pass1[1] - pass0[1])
    heavy = sorted(command_costs(cmd0, cmd1).items(), key=lambda kv: -kv[1][1])[:6]
    return {
        "nodes": nodes,
        "routers": routers,
        "endpoints": endpoints_now,
        "redis_cpu": cpu,
        "ops": ops,
        "probes_done": probes / (nodes * (warm + seconds) / PROBE_S),
        "appear": (percentile(appear, 0.5), percentile(appear, 0.99)),
        "vanish": (percentile(vanish, 0.5), percentile(vanish, 0.99)),
        "refresh_ms": (
            1000 * statistics.mean(costs) if costs else float("nan"),
            1000 * percentile(costs, 0.99),
        ),
        "refreshes_per_table_s": len(costs) / tables / seconds,
        "pass_ms": 1000 * passes,
        "lost": lost,
        "extra_full": extra_full,
        "heavy": [(name, calls / wall, usec / calls) for name, (calls, usec) in heavy],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="100x1,300x5", help="NODESxROUTERS,...")
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    steps = [tuple(int(x) for x in s.split("x")) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        server = RedisServer(tmp / "redis")
        server.start()
        try:
            for nodes, routers in steps:
                r = run_step(server, tmp, nodes, routers, args.seconds)
                print(
                    f"\n== {nodes} nodes, {r['endpoints']} endpoints, {routers} routers "
                    f"({routers * WORKERS_PER_ROUTER} tables); agents managed "
                    f"{100 * r['probes_done']:.0f}% of their probes"
                )
                if r["lost"]:
                    print(
                        f"!! {r['lost']} simulator processes died (Redis timed out under "
                        "them): this machine could not drive this step"
                    )
                print(f"Redis CPU {r['redis_cpu']:.2f} cores, {r['ops']:.0f} ops/s")
                print(
                    "new endpoint -> every table: p50 {:.0f} ms, p99 {:.0f} ms".format(
                        *(1000 * x for x in r["appear"])
                    )
                )
                print(
                    "withdrawn endpoint -> gone from every table: p50 {:.0f} ms, "
                    "p99 {:.0f} ms".format(*(1000 * x for x in r["vanish"]))
                )
                print(
                    f"routing table refresh (measured window; wall time, waiting for this "
                    f"machine's cores included): mean {r['refresh_ms'][0]:.2f} ms, "
                    f"p99 {r['refresh_ms'][1]:.2f} ms, "
                    f"{r['refreshes_per_table_s']:.2f} refreshes/s per table; full reads "
                    f"after the first: {r['extra_full']}"
                )
                print(f"scheduler pass: mean {r['pass_ms']:.1f} ms")
                for name, per_s, usec in r["heavy"]:
                    print(
                        f"  {name:<22} {per_s:9.0f} calls/s {usec:9.1f} us/call "
                        f"= {per_s * usec / 1e6:5.2f} cores"
                    )
        finally:
            server.stop()


if __name__ == "__main__":
    main()

"""Placement and reconcile benchmark (run by hand; figures go in the README).

    .venv/bin/python -m bench.placement [--nodes 1000] [--gpus 8] [--requests 5000]

1. The pure placement function: a full plan of every request on an empty cluster.
2. The scheduler against a real redis-server: the first full pass (read, plan,
   write everything), a steady-state pass, and the pass that places one new
   request; with the Redis round trips of each pass, at two cluster sizes, to
   show that they do not grow with the number of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio.connection import Connection

from harness.processes import RedisServer
from nebula.models import Device, ModelRequest, ModelSpec, Node, Phase, PlacementState, Status
from nebula.scheduler.placement import plan
from nebula.scheduler.service import Scheduler
from nebula.scheduler.usage import Usage
from nebula.settings import Settings
from nebula.store import State

CEILING = 0.9


def make_nodes(n: int, gpus: int, rng: random.Random) -> list[Node]:
    return [
        Node(
            id=f"node-{i:04d}",
            address=f"10.0.{i // 256}.{i % 256}",
            devices=tuple(
                Device(
                    index=g,
                    name="NVIDIA H100 80GB HBM3",
                    memory_total_mib=81559,
                    memory_used_mib=rng.choice([0, 0, 0, 1024]),  # some unmanaged usage
                )
                for g in range(gpus)
            ),
            port_min=8100,
            port_max=8299,
            heartbeat_at=time.time(),
        )
        for i in range(n)
    ]


def make_specs(n: int, rng: random.Random) -> list[tuple[ModelSpec, int]]:
    return [
        (
            ModelSpec(
                name=f"model-{i:05d}",
                model=f"org/model-{i}",
                gpu_memory_utilization=rng.choice([0.1, 0.2, 0.25, 0.3, 0.4, 0.5]),
                tensor_parallel_size=rng.choice([1] * 8 + [2, 4]),
            ),
            rng.choice([1, 1, 2, 3]),
        )
        for i in range(n)
    ]


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_pure(nodes: list[Node], specs: list[tuple[ModelSpec, int]]) -> None:
    requests = [
        ModelRequest(id=f"req-{i}", spec=s, replicas=r, created_at=i)
        for i, (s, r) in enumerate(specs)
    ]
    full_s, result = timed(lambda: plan(nodes, requests, [], ceiling=CEILING), 3)
    placed = result.new  # type: ignore[attr-defined]
    usage = Usage.of(placed)  # what the scheduler keeps between passes
    one = ModelRequest(id="req-new", spec=specs[0][0], replicas=2, created_at=1e12)
    one_s, _ = timed(lambda: plan(nodes, [*requests, one], usage=usage, ceiling=CEILING), 5)
    steady_s, _ = timed(lambda: plan(nodes, requests, usage=usage, ceiling=CEILING), 5)
    gpus = sum(len(n.devices) for n in nodes)
    print(f"pure plan, {len(nodes)} nodes x {gpus // len(nodes)} GPUs, {len(requests)} requests:")
    print(f"  full plan ({len(placed)} replicas placed) ..... {full_s * 1000:8.1f} ms")
    print(f"  one new request on the full cluster ....... {one_s * 1000:8.1f} ms")
    print(f"  steady state, nothing to place ............ {steady_s * 1000:8.1f} ms")


class RoundTrips:
    """Counts what a client sends to Redis: one send is one round trip."""

    count = 0

    def __enter__(self) -> RoundTrips:
        self._orig = Connection.send_packed_command
        counter = self

        async def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            counter.count += 1
            await counter._orig(conn, command, check_health)

        # Counting round trips: wrap the one method every command goes through.
        setattr(Connection, "send_packed_command", counted)  # noqa: B010
        return self

    def __exit__(self, *exc: object) -> None:
        Connection.send_packed_command = self._orig  # type: ignore[method-assign]


async def bench_cycle(url: str, nodes: list[Node], specs: list[tuple[ModelSpec, int]]) -> None:
    state = State(url)
    await state.redis.flushall()
    settings = Settings(redis_url=url, leader_ttl_s=600, memory_ceiling=CEILING)
    for node in nodes:
        await state.nodes.heartbeat(node, ttl_s=600)
    for spec, replicas in specs:
        await state.requests.create(spec, replicas)
    scheduler = Scheduler(state, settings)

    start = time.perf_counter()
    await scheduler.step()  # leader, full read, everything placed
    first_s = time.perf_counter() - start

    # Every engine up: the agents report Healthy; the next passes mark requests Ready.
    by_node: dict[str, dict[str, PlacementState]] = {}
    for p in scheduler.usage.placements.values():
        by_node.setdefault(p.node, {})[p.id] = PlacementState(phase=Phase.HEALTHY)
    for node_id, states in by_node.items():
        await state.placements.report(node_id, states)
    await scheduler.step()
    await scheduler.step()
    ready = sum(1 for r in scheduler.snapshot.requests.values() if r.status is Status.READY)

    steady = []
    for _ in range(5):
        with RoundTrips() as trips:
            start = time.perf_counter()
            await scheduler.step()
            steady.append(time.perf_counter() - start)
    steady_trips = trips.count

    one = []
    one_trips = 0
    for i in range(5):
        spec = ModelSpec(name=f"extra-{i}", model="org/extra", gpu_memory_utilization=0.2)
        await state.requests.create(spec, 1)
        with RoundTrips() as trips:
            start = time.perf_counter()
            changes = await scheduler.step()
            one.append(time.perf_counter() - start)
        assert changes and len(changes.put_placements) == 1
        one_trips = trips.count
    telemetry = []
    for _ in range(3):
        start = time.perf_counter()
        await scheduler.cluster.read_telemetry(scheduler.snapshot, scheduler.snapshot.alive)
        telemetry.append(time.perf_counter() - start)
    await state.close()
    print(f"scheduler pass with Redis, {len(nodes)} nodes, {len(specs)} requests ({ready} Ready):")
    print(f"  first pass, everything placed ............. {first_s * 1000:8.1f} ms")
    print(
        f"  steady state .............................. {statistics.median(steady) * 1000:8.1f} ms"
        f"  ({steady_trips} round trips)"
    )
    print(
        f"  one new request placed .................... {statistics.median(one) * 1000:8.1f} ms"
        f"  ({one_trips} round trips)"
    )
    print(
        f"  telemetry refresh, once a heartbeat ....... "
        f"{statistics.median(telemetry) * 1000:8.1f} ms"
        "  (1 round trip)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    rng = random.Random(42)
    nodes = make_nodes(args.nodes, args.gpus, rng)
    specs = make_specs(args.requests, rng)
    bench_pure(nodes, specs)
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            small = max(1, args.requests // 50)
            asyncio.run(bench_cycle(server.url, nodes, specs[:small]))
            asyncio.run(bench_cycle(server.url, nodes, specs))
        finally:
            server.stop()


if __name__ == "__main__":
    main()

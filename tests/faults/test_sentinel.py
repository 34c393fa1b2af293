"""Redis failover through Sentinel, under steady load: no request fails, no engine
restarts, no node is declared lost, the cluster keeps loading models, and the old
master rejoins as a replica without any Nebula process restarting."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from harness.cluster import TEST_CATALOG, Cluster
from harness.processes import free_port
from nebula.store import State
from tests.faults.conftest import CLIENT_KEY, Node, steady_load
from tests.faults.sentinel import MASTER_NAME, SentinelTopology

TTL_S = 4.0


@pytest.fixture
async def ha(tmp_path: Path) -> AsyncIterator[tuple[Node, SentinelTopology]]:
    topology = SentinelTopology(tmp_path / "ha")
    cluster = Cluster(topology.url, tmp_path, catalog_text=TEST_CATALOG)
    router = cluster.start_router(NEBULA_API_KEYS=CLIENT_KEY)
    state = State(topology.url)
    node = Node(cluster, router, state, topology.servers[0])
    try:
        yield node, topology
    finally:
        await state.close()
        cluster.close()
        topology.close()


def switched(node: Node, since: str) -> dict[str, str]:
    """When each Nebula process logged that it follows the new master."""
    logs = {
        "scheduler": node.cluster.folder / "scheduler.log",
        "agent": node.cluster.paths.logs / "agent.log",
        "router": node.router.log,
    }
    seen = {}
    for name, path in logs.items():
        for line in path.read_text().splitlines():
            if "Redis master changed" in line and line[11:23] >= since:
                seen[name] = line[11:23]
                break
    return seen


async def fail_over(node: Node, topology: SentinelTopology, how: str) -> None:
    request_id = await node.ready(replicas=2)
    pids = await node.engine_pids()
    procs = {"scheduler": node.cluster.scheduler.pid, "node": node.cluster.node.pid,
             "router": node.router.proc.pid}  # fmt: skip
    old = topology.master_port()
    async with steady_load(node.router.url) as load:
        await asyncio.sleep(1.1)  # AOF everysec, replication: let what is written settle
        started = time.strftime("%H:%M:%S,000")
        t0 = time.monotonic()
        if how == "kill":
            topology.server(old).kill()
        else:
            topology.sentinel("SENTINEL", "FAILOVER", MASTER_NAME)
        promoted = await asyncio.to_thread(
            topology.wait, lambda: topology.master_port() != old, 30, "Sentinel to promote"
        )
        await asyncio.sleep(3 * TTL_S)  # every grace, lease and TTL runs out meanwhile
    print(
        f"\n{how}: Sentinel promoted the replica {promoted:.1f}s after t0; "
        f"{load.total} requests, {len(load.failures)} failed; processes on the new "
        f"master at {switched(node, started)} (t0 {started}, {time.monotonic() - t0:.0f}s ago)"
    )
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:5]}"
    assert load.total > 50
    assert await node.engine_pids() == pids, "an engine was restarted"
    events = [e["message"] for e in await node.state.requests.events(request_id)]
    assert not any("lost" in e for e in events), events
    assert set(switched(node, started)) == {"scheduler", "agent", "router"}
    # The cluster still works: a new model is loaded and served after the failover.
    await node.ready("slow_chat", replicas=1)
    if how == "kill":
        # The old master comes back and Sentinel makes it a replica of the new one.
        topology.server(old).start()
        await asyncio.to_thread(
            topology.wait, lambda: topology.role(topology.server(old)) == "slave", 30,
            "the old master to rejoin as a replica",
        )  # fmt: skip
    assert {"scheduler": node.cluster.scheduler.pid, "node": node.cluster.node.pid,
            "router": node.router.proc.pid} == procs  # fmt: skip
    for proc in (node.cluster.scheduler, node.cluster.node, node.router.proc):
        assert proc.poll() is None
    assert re.search(r"Redis master changed", node.router.log.read_text())


@pytest.mark.timeout(240)
async def test_master_killed_sentinel_fails_over_and_nothing_is_lost(
    ha: tuple[Node, SentinelTopology],
) -> None:
    await fail_over(*ha, "kill")


@pytest.mark.timeout(240)
async def test_sentinel_failover_command_loses_nothing(
    ha: tuple[Node, SentinelTopology],
) -> None:
    await fail_over(*ha, "command")


def test_a_sentinel_url_without_a_master_or_sentinels_is_one_clear_line(tmp_path: Path) -> None:
    def run(url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "NEBULA_REDIS_URL": url, "NEBULA_STATE_DIR": str(tmp_path),
               "NEBULA_REDIS_SENTINEL_PASSWORD": "sentinel-secret"}  # fmt: skip
        return subprocess.run([sys.executable, "-m", "nebula.daemons", "scheduler"],
                              env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip

    no_master = run("redis+sentinel://:master-secret@127.0.0.1:26379,127.0.0.1:26380")
    assert no_master.returncode == 2
    assert "names no master" in no_master.stderr and "master-secret" not in no_master.stderr
    ports = [free_port(), free_port()]
    nobody = run(f"redis+sentinel://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/nebula")
    assert nobody.returncode == 1
    [line] = nobody.stderr.strip().splitlines()
    assert f"no Sentinel (127.0.0.1:{ports[0]}, 127.0.0.1:{ports[1]}) names a master" in line
    assert "sentinel-secret" not in nobody.stderr

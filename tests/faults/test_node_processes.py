"""A node is one unit: killing supervisord takes the agent and the engines with it,
and the node comes back with no orphan and no duplicate; killing the agent alone
costs no request and no engine."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from harness.cluster import wait_for
from harness.processes import spawn
from nebula.agent.supervisor import Supervisor
from nebula.models import Status
from tests.faults.conftest import Node, steady_load


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def agent_pid(node: Node) -> int:
    paths = node.cluster.paths
    supervisor = Supervisor(paths.socket, paths.programs, paths.logs)
    return int(supervisor._call("supervisor.getProcessInfo", "nebula-agent")["pid"])


def engines_on(ports: range) -> list[str]:
    """Test engines of this cluster still running, by their --port argument."""
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        if "nebula.testengine" in line and "--port" in line:
            port = int(line.split("--port", 1)[1].split()[0])
            if port in ports:
                found.append(line.strip())
    return found


@pytest.mark.timeout(180)
async def test_killed_supervisord_takes_its_node_down_and_the_node_comes_back(
    node: Node,
) -> None:
    request_id = await node.ready(replicas=2)
    pids = await node.engine_pids()
    agent = agent_pid(node)
    env = node.cluster.env
    ports = range(int(env["NEBULA_ENGINE_PORT_MIN"]), int(env["NEBULA_ENGINE_PORT_MAX"]) + 1)
    statuses: list[Status] = []

    async def watch() -> None:
        while True:
            statuses.append((await node.state.requests.get(request_id)).status)
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        os.kill(node.cluster.node.pid, signal.SIGKILL)  # `nebula node` exec'd supervisord
        node.cluster.node.wait(10)

        async def all_gone() -> bool:
            return not any(alive(p) for p in [agent, *pids.values()])

        await wait_for(all_gone, 15, "the agent and engines to die with supervisord")
        assert engines_on(ports) == []
        # The node comes back: its old program files may name placements the
        # scheduler has moved on from; nothing starts twice on one port.
        node.cluster.node = spawn(
            [sys.executable, "-m", "nebula.daemons", "node"],
            node.cluster.folder / "node.log",
            env,
        )

        async def new_engines_healthy() -> bool:
            now = await node.engine_pids()
            return len(now) == 2 and not set(now.values()) & set(pids.values())

        await wait_for(new_engines_healthy, 60, "two new engines, healthy")
        await node.cluster.status(node.state, request_id, Status.READY, timeout=30)
        assert len(engines_on(ports)) == 2, engines_on(ports)
        async with steady_load(node.router.url) as load:
            await asyncio.sleep(2)
        assert load.failures == [] and load.total > 10, load.failures[:5]
        await asyncio.sleep(1)
        assert len(engines_on(ports)) == 2, engines_on(ports)
    finally:
        watcher.cancel()
    assert Status.FAILED not in statuses, statuses


@pytest.mark.timeout(120)
async def test_killed_agent_costs_no_request_and_no_engine(node: Node) -> None:
    request_id = await node.ready(replicas=2)
    pids = await node.engine_pids()
    async with steady_load(node.router.url) as load:
        await asyncio.sleep(1)
        for _ in range(3):  # three restarts in a row
            old = agent_pid(node)
            os.kill(old, signal.SIGKILL)

            def restarted(old: int = old) -> bool:
                try:
                    return agent_pid(node) not in (0, old)
                except OSError:
                    return False

            async def back() -> bool:
                return restarted()

            await wait_for(back, 20, "supervisord to restart the agent")
            await asyncio.sleep(2)
        await asyncio.sleep(4)  # a whole node TTL after the last restart
    print(f"\nagent killed 3 times: {load.total} requests, {len(load.failures)} failed")
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:5]}"
    assert load.total > 50
    assert await node.engine_pids() == pids
    events = [e["message"] for e in await node.state.requests.events(request_id)]
    assert not any("lost" in e for e in events), events

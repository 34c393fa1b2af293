"""The request lifecycle under faults, per the state machine in docs/architecture.md:
lost replicas make a served model Degraded (not Loading); a failed replica is
replaced while its siblings serve (not Failed); an engine's old crashes stop
counting once it has been healthy a while."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from harness.cluster import Cluster, wait_for
from nebula.catalog import load_catalog
from nebula.models import Desired, Phase, Status
from nebula.scheduler.service import Scheduler
from nebula.settings import Settings
from nebula.store import State
from tests.builders import cpu_node
from tests.nodesim import NodeSim, status_of

CHAT = load_catalog().get_spec("smollm2_135m_chat")  # 5 GiB of RAM


async def test_a_ready_model_whose_replicas_are_all_lost_is_degraded(
    state: State, settings: Settings
) -> None:
    node = NodeSim(state, cpu_node("cpu-a"), ttl_s=0.5)
    await node.beat()
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(CHAT, 1)
    await scheduler.step()
    await node.converge(Phase.HEALTHY)
    await scheduler.step()
    assert (await status_of(state, request.id))[0] is Status.READY
    # cpu-a goes silent; after its TTL and the scheduler's grace it is dead.
    deadline = time.monotonic() + 10
    while (await status_of(state, request.id))[0] is Status.READY:
        await scheduler.step()
        await asyncio.sleep(0.1)
        assert time.monotonic() < deadline, "the lost replica was never noticed"
    status, message = await status_of(state, request.id)
    assert status is Status.DEGRADED, (status, message)
    assert message.startswith("0/1 replicas healthy"), message


async def test_a_failed_replica_is_replaced_while_its_sibling_serves(
    state: State, settings: Settings
) -> None:
    settings = settings.model_copy(update={"replacement_backoff_s": 0.3})
    a = NodeSim(state, cpu_node("cpu-a", ram_gib=12))
    b = NodeSim(state, cpu_node("cpu-b", ram_gib=12))
    await a.beat()
    await b.beat()
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(CHAT, 2)
    await scheduler.step()
    for n in (a, b):
        await n.converge(Phase.HEALTHY)
    await scheduler.step()
    assert (await status_of(state, request.id))[0] is Status.READY
    [failing] = await a.placements()
    await a.report(failing.id, Phase.FAILED, "crashed 4 times; last log: CUDA error")
    await scheduler.step()
    status, message = await status_of(state, request.id)
    assert status is Status.DEGRADED, message  # one replica still serves: not Failed
    assert "replacing it" in message and "CUDA error" in message
    # The agent stops it; after the back-off a replacement is placed and comes up.
    deadline = time.monotonic() + 10
    while True:
        for n in (a, b):
            await n.beat()
            await n.converge(Phase.HEALTHY)
        await scheduler.step()
        running = [p for n in (a, b) for p in await n.placements() if p.desired is Desired.RUN]
        if len(running) == 2 and failing.id not in {p.id for p in running}:
            break
        assert time.monotonic() < deadline, "no replacement"
        await asyncio.sleep(0.1)
    for n in (a, b):
        await n.converge(Phase.HEALTHY)
    await scheduler.step()
    assert await status_of(state, request.id) == (Status.READY, "2/2 replicas healthy")
    events = [e["message"] for e in await state.requests.events(request.id)]
    assert any("it failed: crashed 4 times" in e for e in events), events


@pytest.mark.timeout(120)
async def test_an_engines_restart_count_decays_after_a_healthy_while(
    redis_url: str, state: State, tmp_path: Path
) -> None:
    cluster = Cluster(redis_url, tmp_path, extra_env={"NEBULA_RESTART_DECAY_S": "1.5"})
    try:
        request = await cluster.load(state, "tiny_chat")
        await cluster.status(state, request.id, Status.READY, timeout=30)

        async def healthy() -> tuple[int, int] | None:
            [s] = (await state.placements.states("node-a")).values()
            return (s.pid, s.restarts) if s.phase is Phase.HEALTHY and s.pid else None

        for crash in (1, 2, 3):  # max_restarts is 2: three crashes, each forgiven in time
            pid, _ = await wait_for(healthy, 20, "a healthy engine")
            os.kill(pid, signal.SIGKILL)

            async def restarted(pid: int = pid, crash: int = crash) -> bool:
                now = await healthy()
                return now is not None and now[0] != pid and now[1] == 1

            await wait_for(restarted, 20, f"restart {crash} counted")

            async def forgiven() -> bool:
                now = await healthy()
                return now is not None and now[1] == 0

            await wait_for(forgiven, 20, "the restart count back to 0")
        # Three crashes with max_restarts=2 and no decay would have failed the engine;
        # instead the model is still served.
        assert (await state.requests.get(request.id)).status is Status.READY
    finally:
        cluster.close()

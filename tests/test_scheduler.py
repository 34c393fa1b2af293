"""The scheduler against a real redis-server, with nodes played by the test."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from harness.cluster import wait_for
from harness.processes import spawn
from nebula import redis_keys
from nebula.catalog import load_catalog
from nebula.models import Desired, Phase, Status
from nebula.scheduler.reconcile import reconcile
from nebula.scheduler.service import Scheduler
from nebula.scheduler.store import ClusterStore
from nebula.settings import Settings
from nebula.store import State
from tests.builders import cpu_node, gpu_node
from tests.nodesim import NodeSim, status_of

CATALOG = load_catalog()
CHAT = CATALOG.get_spec("smollm2_135m_chat")  # 5 GiB of RAM on a CPU node
QWEN = CATALOG.get_spec("qwen2_5_0_5b_chat")  # 0.40 of a GPU


async def test_request_lifecycle_from_load_to_gone(
    state: State, settings: Settings, redis_url: str
) -> None:
    node = NodeSim(state, cpu_node("cpu-1"))
    await node.beat()
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(CHAT, 1)

    await scheduler.step()
    [placement] = await node.placements()
    assert placement.request_id == request.id and placement.port == settings.engine_port_min
    assert placement.desired is Desired.RUN
    assert await status_of(state, request.id) == (Status.SCHEDULED, "1/1 replicas placed")

    await node.converge(Phase.STARTING)
    await scheduler.step()
    assert (await status_of(state, request.id))[0] is Status.LOADING

    await node.converge(Phase.HEALTHY)
    await scheduler.step()
    assert await status_of(state, request.id) == (Status.READY, "1/1 replicas healthy")
    assert not await scheduler.step()  # level-triggered: nothing left to do

    await state.requests.unload(request.id)
    await scheduler.step()
    [stopping] = await node.placements()
    assert stopping.desired is Desired.STOP
    assert (await status_of(state, request.id))[0] is Status.UNLOADING

    await node.converge()
    await scheduler.step()
    assert await node.placements() == []
    assert await state.requests.all() == []
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    left = sorted(client.keys("*"))
    client.close()
    # Only the node's own keys remain, and the routers' version counter: no request,
    # event stream, model index or placement.
    assert left == [
        redis_keys.node("cpu-1"),
        redis_keys.NODES,
        redis_keys.ROUTING_VERSION,
        redis_keys.SCHEDULER_LEADER,
    ]


async def test_event_history_tells_the_story(state: State, settings: Settings) -> None:
    node = NodeSim(state, cpu_node("cpu-1"))
    await node.beat()
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(CHAT, 1)
    await scheduler.step()
    await node.converge(Phase.HEALTHY)
    await scheduler.step()
    messages = [e["message"] for e in await state.requests.events(request.id)]
    assert messages == [
        "load asked: 1 replica(s)",
        "Scheduled on cpu-1 (CPU), port 8100",
        "Scheduled: 1/1 replicas placed",
        "Ready: 1/1 replicas healthy",
    ]


async def test_pending_with_reason_until_room_appears(state: State, settings: Settings) -> None:
    await NodeSim(state, cpu_node("cpu-1")).beat()
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(QWEN, 2)
    await scheduler.step()
    assert await status_of(state, request.id) == (
        Status.PENDING,
        "replica 1/2 Pending: no GPU with 0.40 free; replica 2/2 Pending: no GPU with 0.40 free",
    )
    gpu = NodeSim(state, gpu_node("gpu-1", gpus=1))
    await gpu.beat()
    await scheduler.step()
    assert len(await gpu.placements()) == 2  # spread: one node, so both on its GPU (0.8 <= 0.9)
    assert (await status_of(state, request.id))[0] is Status.SCHEDULED


async def test_unload_while_pending_goes_straight_through_unloading(
    state: State, settings: Settings
) -> None:
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(QWEN, 1)
    await scheduler.step()
    assert (await status_of(state, request.id))[0] is Status.PENDING
    assert (await state.requests.unload(request.id)).status is Status.UNLOADING
    await scheduler.step()
    assert await state.requests.all() == []


async def test_dead_node_replicas_are_rescheduled(
    state: State, settings: Settings, redis_url: str
) -> None:
    # Heartbeats that live 2 s, beaten before every step while cpu-a should be alive:
    # a slow machine never lets it expire before the test means it to.
    a = NodeSim(state, cpu_node("cpu-a", ram_gib=24), ttl_s=2.0)
    b = NodeSim(state, cpu_node("cpu-b", ram_gib=12), ttl_s=2.0)  # tighter: a best fit would pick b
    await a.beat()
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(CHAT, 1)
    await scheduler.step()
    await a.beat()
    await a.converge(Phase.HEALTHY)
    await a.beat()
    await scheduler.step()
    assert (await status_of(state, request.id))[0] is Status.READY
    await a.beat()
    await b.beat()

    # cpu-a stops heartbeating; its key expires; that is its death.
    deadline = time.monotonic() + 10
    while [n.id for n in await state.nodes.live()] != ["cpu-b"]:
        await b.beat()
        await asyncio.sleep(0.1)
        assert time.monotonic() < deadline, "cpu-a's heartbeat key did not expire"
    # The scheduler became leader moments ago: it spares silent nodes for one node TTL
    # (grace, not panic), then declares cpu-a dead.
    deadline = time.monotonic() + 10
    while not await b.placements():
        await b.beat()
        await scheduler.step()
        await asyncio.sleep(0.1)
        assert time.monotonic() < deadline, "cpu-a was never declared dead"
    [moved] = await b.placements()
    assert moved.request_id == request.id
    messages = [e["message"] for e in await state.requests.events(request.id)]
    assert "node cpu-a lost: replica on it is gone" in messages
    assert "Scheduled on cpu-b (CPU), port 8100" in messages
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert not client.exists(redis_keys.placements("cpu-a"))
    assert client.smembers(redis_keys.NODES) == {"cpu-b"}
    client.close()
    await b.converge(Phase.HEALTHY)
    await scheduler.step()
    assert (await status_of(state, request.id))[0] is Status.READY


async def test_drain_moves_replicas_only_once_the_replacement_is_healthy(
    state: State, settings: Settings
) -> None:
    a = NodeSim(state, cpu_node("cpu-a"))
    b = NodeSim(state, cpu_node("cpu-b"))
    await a.beat()
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(CHAT, 1)
    await scheduler.step()
    await a.converge(Phase.HEALTHY)
    await b.beat()
    await scheduler.step()

    await state.nodes.set_cordon("cpu-a", cordoned=True, drain=True)
    await scheduler.step()
    [old] = await a.placements()
    assert len(await b.placements()) == 1
    assert old.desired is Desired.RUN  # still serving until its replacement is healthy
    await b.converge(Phase.HEALTHY)
    await scheduler.step()
    [old] = await a.placements()
    assert old.desired is Desired.STOP
    await a.converge()
    await scheduler.step()
    assert await a.placements() == []
    assert await status_of(state, request.id) == (Status.READY, "1/1 replicas healthy")


async def test_cordon_blocks_new_placements_and_uncordon_frees(
    state: State, settings: Settings
) -> None:
    node = NodeSim(state, cpu_node("cpu-1"))
    await node.beat()
    await state.nodes.set_cordon("cpu-1", cordoned=True)
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(CHAT, 1)
    await scheduler.step()
    status, message = await status_of(state, request.id)
    assert status is Status.PENDING and "(1 of 1 nodes cordoned)" in message
    await state.nodes.set_cordon("cpu-1", cordoned=False)
    await scheduler.step()
    assert len(await node.placements()) == 1
    with pytest.raises(Exception, match="no node 'ghost'; known nodes: cpu-1"):
        await state.nodes.set_cordon("ghost", cordoned=True)


async def test_a_failed_replica_is_replaced_and_the_request_fails_only_when_none_can_run(
    state: State, settings: Settings
) -> None:
    settings = settings.model_copy(update={"max_replacements": 1, "replacement_backoff_s": 0})
    node = NodeSim(state, cpu_node("cpu-1"))
    await node.beat()
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(CHAT, 1)
    await scheduler.step()
    [p] = await node.placements()
    log = "exited 3 times; last log: OSError: model not found"
    await node.report(p.id, Phase.FAILED, log)
    await scheduler.step()  # the failed replica is stopped, a replacement placed
    status, message = await status_of(state, request.id)
    assert status is not Status.FAILED
    assert "replacing it" in message and log in message
    await node.converge(Phase.STOPPED)  # the agent stops what is no longer wanted
    await scheduler.step()
    [again] = [q for q in await node.placements() if q.desired is Desired.RUN]
    assert again.id != p.id
    await node.report(again.id, Phase.FAILED, log)
    await scheduler.step()
    assert await status_of(state, request.id) == (
        Status.FAILED,
        f"no replica can run: 2 failed; last: {log}",
    )


async def test_unload_racing_a_pass_is_never_overwritten(state: State, settings: Settings) -> None:
    node = NodeSim(state, cpu_node("cpu-1"))
    await node.beat()
    scheduler = Scheduler(state, settings)
    request = await state.requests.create(CHAT, 1)
    assert await state.lease.acquire_or_renew(scheduler.me, 5, held=False)
    snap = await ClusterStore(state).snapshot()
    changes = reconcile(snap, ceiling=0.9, now=time.time())  # would write Scheduled
    await state.requests.unload(request.id)  # lands between the read and the write
    assert await ClusterStore(state).apply(changes, leader=scheduler.me)
    assert (await status_of(state, request.id))[0] is Status.UNLOADING


async def test_only_the_leader_writes(state: State, settings: Settings, redis_url: str) -> None:
    await NodeSim(state, cpu_node("cpu-1"), ttl_s=30).beat()
    first = Scheduler(state, settings, identity="first")
    second = Scheduler(state, settings, identity="second")
    await first.step()
    assert first.is_leader
    await state.requests.create(CHAT, 1)
    assert await second.step() is None and not second.is_leader

    # A pass computed by a scheduler that does not hold the lease writes nothing.
    snap = await ClusterStore(state).snapshot()
    changes = reconcile(snap, ceiling=0.9, now=time.time())
    assert changes.put_placements
    assert not await ClusterStore(state).apply(changes, leader="second")
    assert await state.placements.of_node("cpu-1") == []

    # The leader stops renewing (paused, partitioned); its lease lapses; the other takes over.
    await asyncio.sleep(settings.leader_ttl_s + 0.1)
    await second.step()
    assert second.is_leader and len(await state.placements.of_node("cpu-1")) == 1
    await first.step()  # the old leader finds the lease taken and stands down
    assert not first.is_leader


def spawn_scheduler(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        "NEBULA_REDIS_URL": settings.redis_url,
        "NEBULA_LEADER_TTL_S": "1.5",
        "NEBULA_SCHEDULER_INTERVAL_S": "0.2",
        "NEBULA_LOG_LEVEL": "INFO",
        "NEBULA_SCHEDULER_METRICS_PORT": "0",
    }
    return spawn([sys.executable, "-m", "nebula.daemons", "scheduler"], log, env)


async def test_two_scheduler_daemons_one_leader_and_failover(
    state: State, settings: Settings, tmp_path: Path
) -> None:
    node = NodeSim(state, cpu_node("cpu-1"), ttl_s=30)
    await node.beat()
    procs = {
        p.pid: p for p in (spawn_scheduler(settings, tmp_path / f"s{i}.log") for i in range(2))
    }
    try:
        leader = await wait_for(state.lease.holder, what="a leader")
        leader_pid = int(leader.split(":")[1])
        assert leader_pid in procs
        first = await state.requests.create(CHAT, 1)
        await wait_for(node.placements, what="the first request's placement")

        os.kill(leader_pid, signal.SIGKILL)  # no clean release: the lease must lapse
        procs.pop(leader_pid).wait()

        async def new_leader() -> str | None:
            current = await state.lease.holder()
            return current if current and current != leader else None

        started = time.monotonic()
        successor = await wait_for(new_leader, timeout=10, what="a new leader")
        took = time.monotonic() - started
        assert int(successor.split(":")[1]) in procs
        assert took < settings.leader_ttl_s + 2

        second = await state.requests.create(CATALOG.get_spec("minilm_l6_embedding"), 1)

        async def both_placed() -> bool:
            return {p.request_id for p in await node.placements()} == {first.id, second.id}

        await wait_for(both_placed, what="the second request placed by the new leader")
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            assert proc.wait(10) == 0
    # The survivor released its lease on a clean stop.
    assert await state.lease.holder() is None


def test_each_full_pass_collects_what_the_previous_one_froze() -> None:
    """`gc.freeze` keeps a full pass's objects out of later collections; the next full
    pass must collect those that died since (cyclic garbage is never freed otherwise)."""
    import gc
    import weakref

    from nebula.scheduler.service import refreeze

    class Node:
        pass

    def garbage_cycle() -> weakref.ref[Node]:
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        return weakref.ref(a)

    try:
        alive = garbage_cycle()  # unreachable, but only a collection frees a cycle
        gc.freeze()  # what the previous full pass did
        assert alive() is not None
        refreeze()  # the next full pass
        assert alive() is None, "the previous pass's garbage outlived the next full pass"
        assert gc.get_freeze_count() > 0  # and the new pass's objects are frozen
    finally:
        gc.unfreeze()

"""Idle unloads and evictions, decided by the real scheduler over real Redis, with
simulated nodes: the least recently used idle model makes room; a pinned one,
an operator's one, and one serving a request never do."""

from __future__ import annotations

import asyncio
import time

from nebula.models import ModelSpec, Phase, Status
from nebula.scheduler.service import Scheduler
from nebula.settings import Settings
from nebula.store import State
from tests.builders import cpu_node
from tests.nodesim import NodeSim, status_of


def spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, model=f"test/{name}", engine="test", cpu_memory_gib=4)


def fast(settings: Settings) -> Settings:
    # Every pass reads the models' last use; idle means unused for 3 x 0.02 s.
    return settings.model_copy(update={"usage_flush_s": 0.02})


async def ready(state: State, node: NodeSim, scheduler: Scheduler, ref: str) -> None:
    for _ in range(50):
        await scheduler.step()
        await node.converge(Phase.HEALTHY)
        if (await status_of(state, ref))[0] is Status.READY:
            return
    raise AssertionError(f"{ref} never became Ready: {await status_of(state, ref)}")


async def settle(node: NodeSim, scheduler: Scheduler, passes: int = 6) -> None:
    for _ in range(passes):
        await scheduler.step()
        await node.converge(Phase.HEALTHY)
        await asyncio.sleep(0.03)


async def events(state: State, ref: str) -> list[str]:
    return [e["message"] for e in await state.requests.events(ref)]


async def test_an_idle_model_unloads_after_its_keep_alive(state: State, settings: Settings) -> None:
    node = NodeSim(state, cpu_node("cpu-a"), ttl_s=30)
    await node.beat()
    scheduler = Scheduler(state, fast(settings))
    # A keep-alive long enough that no slow pass outlives it by accident, short
    # enough to wait for.
    idle = await state.requests.create(spec("idle"), 1, keep_alive_s=2.0, on_demand=True)
    pinned = await state.requests.create(spec("pinned"), 1)  # an operator's load
    await ready(state, node, scheduler, idle.id)
    await ready(state, node, scheduler, pinned.id)
    await state.requests.mark_used({"idle": time.time(), "pinned": time.time() - 3600})

    # Within its keep-alive (and used just now) it stays.
    used = time.monotonic()
    await settle(node, scheduler, passes=3)
    assert time.monotonic() - used < 2.0, "the passes outlived the keep-alive: no check"
    assert (await status_of(state, idle.id))[0] is Status.READY

    # Past it, it goes: within a few passes once 2 s have gone by.
    deadline = time.monotonic() + 15
    while idle.id in {r.id for r in await state.requests.all()}:
        assert time.monotonic() < deadline, await status_of(state, idle.id)
        await settle(node, scheduler, passes=1)
    assert time.monotonic() - used >= 2.0, "unloaded within its keep-alive"
    # Unused for an hour, but pinned: an operator's load stays until unloaded.
    assert (await status_of(state, pinned.id))[0] is Status.READY
    assert await node.placements() and all(p.model == "pinned" for p in await node.placements())


async def test_the_least_recently_used_idle_model_is_evicted_for_a_new_load(
    state: State, settings: Settings
) -> None:
    node = NodeSim(state, cpu_node("cpu-a", ram_gib=10), ttl_s=30)  # room for two of 4 GiB
    await node.beat()
    scheduler = Scheduler(state, fast(settings))
    older = await state.requests.create(spec("older"), 1, keep_alive_s=3600, on_demand=True)
    newer = await state.requests.create(spec("newer"), 1, keep_alive_s=3600, on_demand=True)
    await ready(state, node, scheduler, older.id)
    await ready(state, node, scheduler, newer.id)
    now = time.time()
    await state.requests.mark_used({"older": now - 120, "newer": now - 60})

    wanted = await state.requests.create(spec("wanted"), 1, keep_alive_s=60, on_demand=True)
    deadline = time.monotonic() + 10
    while (await status_of(state, older.id))[0] is not Status.UNLOADING:
        assert time.monotonic() < deadline, await status_of(state, wanted.id)
        await scheduler.step()
        await asyncio.sleep(0.03)
    assert any("evicted (idle" in e and "for wanted" in e for e in await events(state, older.id))
    await ready(state, node, scheduler, wanted.id)

    assert older.id not in {r.id for r in await state.requests.all()}
    assert (await status_of(state, newer.id))[0] is Status.READY
    assert any("evicting idle older" in e for e in await events(state, wanted.id))
    assert sorted(p.model for p in await node.placements()) == ["newer", "wanted"]


async def test_a_pinned_model_and_one_serving_requests_are_never_evicted(
    state: State, settings: Settings
) -> None:
    node = NodeSim(state, cpu_node("cpu-a", ram_gib=10), ttl_s=30)
    await node.beat()
    scheduler = Scheduler(state, fast(settings))
    pinned = await state.requests.create(spec("pinned"), 1)
    busy = await state.requests.create(spec("busy"), 1, keep_alive_s=2.0, on_demand=True)
    await ready(state, node, scheduler, pinned.id)
    await ready(state, node, scheduler, busy.id)
    await state.requests.mark_used({"pinned": time.time() - 3600})

    wanted = await state.requests.create(spec("wanted"), 1, keep_alive_s=60, on_demand=True)
    for _ in range(20):
        # The routers see a request in flight on `busy`: used "now" at every flush.
        await state.requests.mark_used({"busy": time.time()})
        await settle(node, scheduler, passes=1)
    status, message = await status_of(state, wanted.id)
    assert status is Status.PENDING and "no CPU node with 4 GiB RAM free" in message
    assert (await status_of(state, pinned.id))[0] is Status.READY
    assert (await status_of(state, busy.id))[0] is Status.READY

    # Once `busy` goes quiet it is idle, and evicted for `wanted` (its keep-alive only
    # bounds how long an idle model stays when nothing needs the room).
    deadline = time.monotonic() + 15
    while (await status_of(state, wanted.id))[0] is not Status.READY:
        assert time.monotonic() < deadline, await status_of(state, wanted.id)
        await settle(node, scheduler, passes=1)
    assert any("evicting idle busy" in e for e in await events(state, wanted.id))
    assert busy.id not in {r.id for r in await state.requests.all()}
    assert (await status_of(state, pinned.id))[0] is Status.READY


async def test_a_load_that_fits_nowhere_even_after_eviction_stays_pending(
    state: State, settings: Settings
) -> None:
    node = NodeSim(state, cpu_node("cpu-a", ram_gib=10), ttl_s=30)
    await node.beat()
    scheduler = Scheduler(state, fast(settings))
    idle = await state.requests.create(spec("idle"), 1, keep_alive_s=3600, on_demand=True)
    await ready(state, node, scheduler, idle.id)
    huge = ModelSpec(name="huge", model="test/huge", engine="test", cpu_memory_gib=40)
    wanted = await state.requests.create(huge, 1, keep_alive_s=60, on_demand=True)
    await settle(node, scheduler)
    status, message = await status_of(state, wanted.id)
    assert status is Status.PENDING and "40 GiB" in message
    assert (await status_of(state, idle.id))[0] is Status.READY  # evicting it would not do

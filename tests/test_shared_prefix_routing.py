"""Cache-aware routing on the workloads production has: one app's long system
prompt shared by every user, several routers, engines that queue. Test engines
that keep a prefix cache as vLLM does (chained block hashes, a first byte that
waits for the uncached part) behind real routers, over real HTTP and Redis."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from harness import workloads
from harness.cluster import wait_for
from harness.endpoints import announce
from harness.processes import EngineProcess, RouterProcess, StartEngines
from nebula.agent import load_report
from nebula.models import Endpoint
from nebula.router import prefix_feed
from nebula.router.prefix import PrefixAffinity
from nebula.store import State

ENGINE_KEY = "engine-shared-prefix"


@pytest.fixture
def engines(start_engines: StartEngines) -> list[EngineProcess]:
    return start_engines(4, ENGINE_KEY, "--prefill-ms-per-kchar", "20")


def fingerprint(engine: EngineProcess) -> str:
    with urllib.request.urlopen(engine.url + "/test/stats", timeout=5) as r:
        return f"testengine-{json.load(r)['pid']}"


async def publish(state: State, engines: list[EngineProcess]) -> None:
    for i, engine in enumerate(engines):
        await announce(state, Endpoint(f"p{i}", "r", "chat", f"n{i}", engine.url, "chat"))


def routers(redis_url: str, tmp_path: Path, n: int, **env: str) -> list[RouterProcess]:
    return [
        RouterProcess(redis_url, tmp_path, 1, NEBULA_ENGINE_API_KEY=ENGINE_KEY, **env)
        for _ in range(n)
    ]


async def routed(router: RouterProcess, n: int) -> None:
    async def check() -> bool:
        async with aiohttp.ClientSession() as s, s.get(router.url + "/health") as r:
            return (await r.json())["endpoints"] >= n

    await wait_for(check, 15, f"{n} endpoints routed")


async def decisions(router: RouterProcess) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(router.url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("nebula_router_routing_decisions_total{"):
            decision = line.split('decision="')[1].split('"')[0]
            out[decision] = out.get(decision, 0) + float(line.rsplit(" ", 1)[1])
    return out


async def test_conversations_on_a_shared_system_prompt_keep_their_replica_and_spread(
    state: State, redis_url: str, tmp_path: Path, engines: list[EngineProcess]
) -> None:
    """16 users of one app (a 3,000-character system prompt for all, then each one's
    own 1,500-character document), 4 turns each, 4 at a time, turns alternating
    between two routers: each conversation stays where its own part is cached, and
    the conversations spread over all 4 replicas."""
    await publish(state, engines)
    pair = routers(redis_url, tmp_path, 2)
    try:
        for router in pair:
            await routed(router, 4)
        convs = workloads.shared_prompt(1, 16, 3000, 1500)
        turns = await workloads.converse([r.url for r in pair], "chat", convs, 4, 4)
        overflowed = sum([(await decisions(r)).get("overflow", 0) for r in pair])
    finally:
        for router in pair:
            router.stop()
    later = len([t for t in turns if t.turn])
    # Turns over the load bound may move (and say so: "overflow"); the rest follow.
    assert workloads.followed(turns) * later >= 0.9 * (later - overflowed), (
        workloads.followed(turns),
        overflowed,
    )
    shares = workloads.shares(turns)
    assert set(shares) == {fingerprint(e) for e in engines}, shares  # no replica idle
    assert max(shares.values()) <= 1.5 / 4, shares  # none above 1.5x its fair share


async def test_a_hot_shared_prefix_spreads_within_the_bound_under_load(
    state: State, redis_url: str, tmp_path: Path, engines: list[EngineProcess]
) -> None:
    """40 new conversations on one system prompt at once, 16 in flight: every replica
    takes its part, none more than the bound allows."""
    await publish(state, engines)
    for engine in engines:
        engine.behave(token_ms=20)  # answers that take a while: the load is real
    (router,) = routers(redis_url, tmp_path, 1)
    try:
        await routed(router, 4)
        convs = workloads.shared_prompt(2, 40, 3000, 300)
        turns = await workloads.converse([router.url], "chat", convs, 1, 16)
    finally:
        router.stop()
    shares = workloads.shares(turns)
    assert set(shares) == {fingerprint(e) for e in engines}, shares
    assert max(shares.values()) <= 1.5 / 4, shares


async def test_a_router_learns_the_choices_of_another_through_redis(state: State) -> None:
    """The shared index: what one router process sent where, another learns."""
    one, two = PrefixAffinity(), PrefixAffinity()
    reps = [
        Endpoint(f"p{i}", "r", "m", "n", f"http://127.0.0.1:{9000 + i}", "chat") for i in range(4)
    ]
    tasks = [
        asyncio.create_task(prefix_feed.share(state, policy, name))
        for policy, name in ((one, "router-one"), (two, "router-two"))
    ]
    try:
        prompt = one.keys({"messages": workloads.shared_prompt(3, 1, 3000, 1500)[0]})
        # Sent somewhere rendezvous hashing would not pick: an overflow, say.
        own = one.choose(reps, {}, prompt).endpoint.placement_id
        elsewhere = next(e.placement_id for e in reps if e.placement_id != own)
        one.record(prompt, elsewhere)

        async def learned() -> bool:
            return two.index.holders(prompt.keys[-1]) == (elsewhere,)

        await wait_for(learned, 10, "the second router to learn the first one's choice")
        choice = two.choose(reps, {}, prompt)
        assert (choice.endpoint.placement_id, choice.reason) == (elsewhere, "cached")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_replica_whose_engine_queues_gets_fewer_requests(
    state: State, redis_url: str, tmp_path: Path, engines: list[EngineProcess]
) -> None:
    """The load bound counts what the engines report (here: requests another router
    sent, queued in the engine), not only this router's own requests."""
    busy, *rest = engines[:2]
    await publish(state, [busy, *rest])
    busy.behave(max_running=1, token_ms=1000)
    # Someone else's requests: sent straight to the engine, so this router never sees them.
    async with aiohttp.ClientSession() as session:
        body = {"model": "chat", "messages": [{"role": "user", "content": "a b c d"}]}
        headers = {"Authorization": f"Bearer {ENGINE_KEY}"}
        theirs = [
            asyncio.create_task(
                session.post(busy.url + "/v1/chat/completions", json=body, headers=headers)
            )
            for _ in range(6)
        ]
        reporter = asyncio.create_task(
            load_report.report_forever(state, session, "n0", lambda: {"p0": busy.url}, 0.2)
        )
        (router,) = routers(redis_url, tmp_path, 1)
        try:
            await routed(router, 2)

            async def engine_reports_its_queue() -> bool:
                loads = await state.engine_load.of(["n0"])
                return "p0" in loads and loads["p0"].waiting >= 3

            await wait_for(engine_reports_its_queue, 15, "the busy engine's queue reported")

            async def router_counts_it() -> bool:
                async with aiohttp.ClientSession() as s, s.get(router.url + "/admin/cluster") as r:
                    views = (await r.json())["endpoints"]
                return any(v["placement_id"] == "p0" and v["load"] >= 3 for v in views)

            await wait_for(router_counts_it, 15, "the router to count the busy engine's queue")
            convs = workloads.own_prompts(4, 12, 600)
            turns = await workloads.converse([router.url], "chat", convs, 1, 1)
        finally:
            router.stop()
            reporter.cancel()
            for task in theirs:
                task.cancel()
            await asyncio.gather(reporter, *theirs, return_exceptions=True)
    shares = workloads.shares(turns)
    assert fingerprint(busy) not in shares, shares  # every one went to the idle replica

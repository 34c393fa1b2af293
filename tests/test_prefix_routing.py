"""Prefix-affine routing: the ring on its own (pure), then over real HTTP with test
engines that model vLLM's prefix cache (a first byte that waits for the uncached
part of the prompt) behind one and two routers."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from harness.cluster import wait_for
from harness.processes import EngineProcess, RouterProcess, stop
from nebula.models import Endpoint
from nebula.router.prefix import PrefixAffinity, prefix_of
from nebula.store import State

ENGINE_KEY = "engine-prefix"


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"p{i}", "r", "m", "n", f"http://127.0.0.1:{9000 + i}", "chat")
            for i in range(n)]  # fmt: skip


def test_every_router_picks_the_same_replica_for_the_same_prefix() -> None:
    one, two = PrefixAffinity(), PrefixAffinity()
    reps = endpoints(4)
    for i in range(500):
        key = f"system prompt of conversation {i}"
        # Routers see replicas in any order: the ring depends only on the set.
        assert one.choose(reps, {}, key)[0] == two.choose(list(reversed(reps)), {}, key)[0]


def test_a_replica_removed_moves_only_its_share_of_prefixes() -> None:
    policy = PrefixAffinity()
    reps = endpoints(4)
    keys = [f"conversation {i}" for i in range(4000)]
    before = {k: policy.choose(reps, {}, k)[0].placement_id for k in keys}
    after = {k: policy.choose(reps[:3], {}, k)[0].placement_id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "p3" for k in moved), "a prefix moved off a replica that stayed"
    assert {before[k] for k in keys} == {"p0", "p1", "p2", "p3"}
    assert 0.15 < len(moved) / len(keys) < 0.35  # about a quarter: p3's share
    # And a replica added takes about 1/n, from the others only.
    added = {k: policy.choose(endpoints(5), {}, k)[0].placement_id for k in keys}
    assert all(added[k] in (before[k], "p4") for k in keys)


def test_a_hot_prefix_spreads_once_the_load_bound_is_reached() -> None:
    policy = PrefixAffinity(load_factor=1.25)
    reps = endpoints(4)
    key = "everyone asks the same thing"
    inflight: dict[str, int] = {}
    chosen = []
    for _ in range(40):
        endpoint, _ = policy.choose(reps, inflight, key)
        inflight[endpoint.placement_id] = inflight.get(endpoint.placement_id, 0) + 1
        chosen.append(endpoint.placement_id)
    assert len(set(chosen)) == 4, "a hot prefix stayed on one replica"
    most = max(inflight.values())
    assert most <= 1.25 * 40 / 4 + 1, inflight  # nobody over the bound
    own, first = policy.choose(reps, {}, key)
    assert first and chosen[0] == own.placement_id  # idle: the prefix's own replica


def test_the_prefix_is_the_start_of_the_conversation() -> None:
    chat = {"messages": [{"role": "system", "content": "You are terse." * 40},
                         {"role": "user", "content": "hi"}]}  # fmt: skip
    assert prefix_of(chat, 64) == ("system:" + "You are terse." * 40)[:64]
    later = {"messages": [*chat["messages"], {"role": "assistant", "content": "yo"},
                          {"role": "user", "content": "more"}]}  # fmt: skip
    assert prefix_of(later, 256) == prefix_of(chat, 256)  # the next turn: same key
    assert prefix_of({"prompt": "Once upon a time"}, 4) == "Once"
    assert prefix_of({"messages": "not a list"}, 64) is None


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[list[EngineProcess]]:
    started = [
        EngineProcess("chat", tmp_path, ENGINE_KEY, "--prefill-ms-per-kchar", "20")
        for _ in range(2)
    ]
    yield started
    for engine in started:
        stop(engine.proc)


async def publish(state: State, engines: list[EngineProcess]) -> None:
    for i, engine in enumerate(engines):
        endpoint = Endpoint(f"p{i}", "r", "chat", "n", engine.url, "chat")
        await state.endpoints.publish(endpoint)


def stats(engine: EngineProcess) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(engine.url + "/test/stats", timeout=5) as r:
        return json.load(r)  # type: ignore[no-any-return]


async def routed(router: RouterProcess, n: int) -> None:
    async def check() -> bool:
        async with aiohttp.ClientSession() as s, s.get(router.url + "/health") as r:
            return (await r.json())["endpoints"] >= n

    await wait_for(check, 15, f"{n} endpoints routed")


def conversation(seed: int, turns: int) -> list[list[dict[str, str]]]:
    """The message lists of each turn: one long system prompt, then user turns."""
    rng = random.Random(seed)
    system = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"])
                      for _ in range(400))  # fmt: skip
    messages = [{"role": "system", "content": f"conversation {seed}: {system}"}]
    out = []
    for t in range(turns):
        messages = [*messages, {"role": "user", "content": f"question {t} of {seed}"}]
        out.append(messages)
        messages = [*messages, {"role": "assistant", "content": f"echo: question {t}"}]
    return out


async def chat(url: str, messages: list[dict[str, str]]) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"model": "chat", "messages": messages, "max_tokens": 4}
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            await r.read()


async def hit_rate(engines: list[EngineProcess], before: list[dict[str, int]]) -> float:
    now = [stats(e) for e in engines]
    hit = sum(
        n["prefix_hit_chars"] - b["prefix_hit_chars"] for n, b in zip(now, before, strict=True)
    )
    asked = sum(
        n["prefix_query_chars"] - b["prefix_query_chars"] for n, b in zip(now, before, strict=True)
    )
    return hit / asked


async def test_conversations_stay_where_their_prefix_is_cached(
    state: State, redis_url: str, tmp_path: Path, engines: list[EngineProcess]
) -> None:
    await publish(state, engines)
    results = {}
    for policy, seed in (("least_outstanding", 100), ("prefix", 200)):
        router = RouterProcess(redis_url, tmp_path, NEBULA_ENGINE_API_KEY=ENGINE_KEY,
                               NEBULA_ROUTING_POLICY=policy)  # fmt: skip
        try:
            await routed(router, 2)
            before = [stats(e) for e in engines]
            # 16 conversations: least-outstanding's hit rate is a coin toss per request,
            # and with fewer its share of lucky hits varies too much to compare.
            convs = [conversation(seed + c, 4) for c in range(16)]
            for turn in range(4):  # turns in order, conversations two at a time
                for pair in range(0, 16, 2):
                    await asyncio.gather(*(chat(router.url, convs[c][turn])
                                           for c in (pair, pair + 1)))  # fmt: skip
            results[policy] = await hit_rate(engines, before)
        finally:
            router.stop()
    # Every turn after the first repeats the conversation so far: ideal is about 3/4
    # of the characters (the first turn is cold, each later one adds a few).
    assert results["prefix"] > 0.7, results
    assert results["prefix"] > results["least_outstanding"] + 0.1, results


async def test_two_routers_send_a_conversation_to_the_same_replica(
    state: State, redis_url: str, tmp_path: Path, engines: list[EngineProcess]
) -> None:
    await publish(state, engines)
    routers = [RouterProcess(redis_url, tmp_path, NEBULA_ENGINE_API_KEY=ENGINE_KEY,
                             NEBULA_ROUTING_POLICY="prefix") for _ in range(2)]  # fmt: skip
    try:
        for router in routers:
            await routed(router, 2)
        before = [stats(e) for e in engines]
        for c in range(6):
            turns = conversation(300 + c, 4)
            for t, messages in enumerate(turns):
                await chat(routers[t % 2].url, messages)  # alternate routers each turn
        rate = await hit_rate(engines, before)
        assert rate > 0.7, rate
        served = [stats(e)["served"] - b["served"] for e, b in zip(engines, before, strict=True)]
        assert all(s > 0 for s in served), served  # both replicas used, by prefix
    finally:
        for router in routers:
            router.stop()

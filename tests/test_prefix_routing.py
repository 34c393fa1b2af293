"""Prefix-affine routing: the ring on its own (pure), then over real HTTP with test
engines that model vLLM's prefix cache (a first byte that waits for the uncached
part of the prompt) behind one and two routers."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.cluster import wait_for
from harness.endpoints import announce
from harness.processes import EngineProcess, RouterProcess, StartEngines
from nebula.models import Endpoint
from nebula.router.prefix import Choice, PrefixAffinity
from nebula.router.prompt_keys import chain
from nebula.store import State

ENGINE_KEY = "engine-prefix"


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"p{i}", "r", "m", "n", f"http://127.0.0.1:{9000 + i}", "chat")
            for i in range(n)]  # fmt: skip


def chat_of(*contents: str) -> dict[str, Any]:
    roles = ["system", "user", "assistant"]
    return {
        "messages": [
            {"role": roles[min(i, 1) if i < 2 else 2 - i % 2], "content": c}
            for i, c in enumerate(contents)
        ]
    }


def route(
    policy: PrefixAffinity,
    reps: list[Endpoint],
    payload: dict[str, Any],
    inflight: dict[str, int] | None = None,
) -> Choice:
    """Choose, and record the choice, as the router does."""
    prompt = policy.keys(payload)
    choice = policy.choose(reps, inflight or {}, prompt)
    policy.record(prompt, choice.endpoint.placement_id)
    return choice


def test_every_router_picks_the_same_replica_for_a_new_conversation() -> None:
    one, two = PrefixAffinity(), PrefixAffinity()
    reps = endpoints(4)
    for i in range(500):
        payload = chat_of(f"system prompt of conversation {i} " * 20, "hi")
        # Routers see replicas in any order: the choice depends only on the set.
        assert route(one, reps, payload).endpoint == route(two, reps[::-1], payload).endpoint


def test_a_replica_added_or_removed_moves_only_the_conversations_it_held() -> None:
    policy = PrefixAffinity()
    reps = endpoints(4)
    convs = [[f"conversation {i} " * 30, "hi"] for i in range(400)]
    before = {
        i: route(policy, reps, chat_of(*c)).endpoint.placement_id for i, c in enumerate(convs)
    }
    assert {before[i] for i in before} == {"p0", "p1", "p2", "p3"}
    for c in convs:
        c += ["an answer", "next"]
    # p3 goes: its conversations move, every other stays with its cache.
    after = {
        i: route(policy, reps[:3], chat_of(*c)).endpoint.placement_id for i, c in enumerate(convs)
    }
    assert all(after[i] == before[i] for i in before if before[i] != "p3")
    assert all(after[i] != "p3" for i in after)
    # A replica joins: nobody moves (their turns follow their caches); new ones use it.
    for c in convs:
        c += ["an answer", "next"]
    joined = {
        i: route(policy, endpoints(5), chat_of(*c)).endpoint.placement_id
        for i, c in enumerate(convs)
    }
    assert joined == after
    fresh = [route(policy, endpoints(5), chat_of(f"new {i} " * 30)).endpoint for i in range(20)]
    assert any(e.placement_id == "p4" for e in fresh)


def test_a_hot_prompt_spills_once_the_load_bound_is_reached() -> None:
    policy = PrefixAffinity(load_factor=1.25)
    reps = endpoints(4)
    payload = chat_of("everyone asks the same thing " * 20)
    inflight: dict[str, int] = {}
    chosen = []
    for _ in range(40):
        endpoint = route(policy, reps, payload, inflight).endpoint
        inflight[endpoint.placement_id] = inflight.get(endpoint.placement_id, 0) + 1
        chosen.append(endpoint.placement_id)
    assert len(set(chosen)) >= 3, "a hot prompt stayed on one replica"
    assert max(inflight.values()) <= math.ceil(1.25 * 40 / 4) + 2, inflight  # the bound + slack
    idle = route(policy, reps, payload)  # idle: a replica that holds it
    assert idle.reason == "cached" and idle.matched_chars > 0


def test_a_conversation_on_a_shared_system_prompt_follows_its_own_replica() -> None:
    """One app's long system prompt for everyone: new conversations spread over the
    replicas, and each one's later turns go where its own part is cached."""
    policy = PrefixAffinity()
    reps = endpoints(4)
    system = "You are the support assistant of a shop. " * 75  # about 3,000 characters
    convs = [[system, f"my order {c} " * 100] for c in range(40)]
    first = {}
    for c, conv in enumerate(convs):
        first[c] = route(policy, reps, chat_of(*conv)).endpoint.placement_id
    spread = {pid: list(first.values()).count(pid) for pid in first.values()}
    assert len(spread) == 4 and max(spread.values()) <= 40 / 4 * 2, spread
    for turn in range(3):
        for c, conv in enumerate(convs):
            conv += [f"answer {turn}", f"question {turn} " * 10]
            choice = route(policy, reps, chat_of(*conv))
            assert choice.endpoint.placement_id == first[c], (c, turn)
            assert choice.reason == "cached" and choice.matched_chars > 3000 + 1000


def test_a_conversation_whose_replica_is_over_the_bound_overflows_and_moves() -> None:
    policy = PrefixAffinity()
    reps = endpoints(2)
    conv = ["a system prompt " * 50, "a question " * 20]
    own = route(policy, reps, chat_of(*conv)).endpoint.placement_id
    other = "p1" if own == "p0" else "p0"
    conv += ["an answer", "another question"]
    busy = route(policy, reps, chat_of(*conv), {own: 10})  # over 1.25 x 11 / 2 + 2
    assert (busy.reason, busy.endpoint.placement_id) == ("overflow", other)
    conv += ["an answer", "a third question"]
    later = route(policy, reps, chat_of(*conv))  # the deepest known prefix is on the other now
    assert (later.reason, later.endpoint.placement_id) == ("cached", other)


def test_a_next_turn_repeats_every_key_of_the_turn_before() -> None:
    a = chain(chat_of("You are terse." * 40, "hi"), 64, 100_000)
    b = chain(chat_of("You are terse." * 40, "hi", "yo", "more"), 64, 100_000)
    assert b.keys[: len(a.keys)] == a.keys and len(b.keys) > len(a.keys)
    # A cut at every 64 characters and at each message's end.
    system_end = len("system:" + "You are terse." * 40 + "\n")
    assert system_end in a.ends and a.ends[-1] == system_end + len("user:hi\n")
    assert all(e % 64 == 0 for e in a.ends if e not in (system_end, a.ends[-1]))
    # The same text split into other messages is another prompt.
    assert chain(chat_of("You are terse." * 40 + "hi"), 64, 100_000).keys != a.keys
    assert chain({"prompt": "Once upon a time"}, 4, 100).ends == [4, 8, 12, 16]
    assert chain({"messages": "not a list"}, 64, 100).keys == []
    assert chain(chat_of("x" * 1000), 64, 200).ends[-3:] == [128, 192, 200]  # and no further


@pytest.fixture
def engines(start_engines: StartEngines) -> list[EngineProcess]:
    return start_engines(2, ENGINE_KEY, "--prefill-ms-per-kchar", "20")


async def publish(state: State, engines: list[EngineProcess]) -> None:
    for i, engine in enumerate(engines):
        endpoint = Endpoint(f"p{i}", "r", "chat", "n", engine.url, "chat")
        await announce(state, endpoint)


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

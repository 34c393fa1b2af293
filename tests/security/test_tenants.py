"""Tenants over real HTTP: keys scoped to models, token budgets shared by routers,
usage counted exactly, and revocation that no router can miss. Each test failed
on the code before key scopes (30e7774 and after): there, every key could do
everything and nothing was counted per key."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from harness import clients
from harness.cluster import TEST_CATALOG, wait_for
from harness.processes import EngineProcess, RedisServer, RouterProcess
from nebula import redis_keys
from nebula.store import State
from tests.security.conftest import ADMIN_KEY, CHAT, EMBED, READ_KEY, publish, router_env
from tests.security.test_router_edges import http, openai_error, served


def create_key(router: RouterProcess, **fields: object) -> str:
    status, _, body = http("POST", router.url + "/admin/keys", fields, key=ADMIN_KEY)
    assert status == 201, body
    return str(json.loads(body)["key"])


def chat(router: RouterProcess, key: str, model: str = CHAT, **more: object) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], **more}
    status, _, answer = http("POST", router.url + "/v1/chat/completions", body, key=key)
    return status, json.loads(answer)


def engine_tokens(engine: EngineProcess) -> tuple[int, int]:
    """The engine's own counters: (prompt tokens, generation tokens)."""
    with urllib.request.urlopen(engine.url + "/metrics", timeout=5) as r:
        text = r.read().decode()

    def value(name: str) -> int:
        found = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        assert found, name
        return int(float(found.group(1)))

    return value("vllm:prompt_tokens_total"), value("vllm:generation_tokens_total")


async def test_a_key_scoped_to_one_model_is_refused_the_others(
    state: State, router: RouterProcess, engines: Callable[..., EngineProcess]
) -> None:
    await publish(state, engines(CHAT), "p-chat", "chat")
    await publish(state, engines(EMBED), "p-embed", "embedding")
    await served(router, 2)
    scoped = create_key(router, name="team-chat", models=["tiny_*"])
    only_chat = create_key(router, name="chat-only", models=[CHAT])
    await served(router, 2)

    async def key_known() -> bool:
        return chat(router, only_chat)[0] == 200

    await wait_for(key_known, 15, "the new keys in the router's table")
    status, _, body = http(
        "POST", router.url + "/v1/embeddings", {"model": EMBED, "input": "x"}, key=only_chat
    )
    assert status == 403 and openai_error(body)["code"] == "model_not_allowed"
    assert "team-chat" not in body.decode()
    # A glob: both models.
    assert chat(router, scoped)[0] == 200
    status, _, _ = http(
        "POST", router.url + "/v1/embeddings", {"model": EMBED, "input": "x"}, key=scoped
    )
    assert status == 200
    # The models a key may not use are not listed to it, nor found by name.
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=only_chat, max_retries=0)
    assert [m.id for m in client.models.list()] == [CHAT]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(EMBED)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.embeddings.create(model=EMBED, input="x")
    assert refused.value.code == "model_not_allowed"


async def test_a_key_without_on_demand_never_makes_a_model_load(
    state: State, redis_url: str, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(TEST_CATALOG)
    env = router_env(
        NEBULA_ON_DEMAND="true",
        NEBULA_CATALOG_PATH=str(catalog),
        NEBULA_ALLOW_TEST_ENGINE="true",
        NEBULA_HOLD_TIMEOUT_S="3",
    )
    router = RouterProcess(redis_url, tmp_path, **env)
    try:
        no_loads = create_key(router, name="no-loads", on_demand=False)
        await served(router, 0)

        async def key_known() -> bool:
            # The router learns a new key from the routing version it polls, even the
            # router that created it; until then the key is unknown (401).
            return chat(router, no_loads)[0] != 401

        await wait_for(key_known, 15, "the new key in every worker's table")
        status, answer = chat(router, no_loads)
        assert status == 403, answer
        assert answer["error"]["code"] == "on_demand_not_allowed"
        assert "nebula-cli model load tiny_chat" in answer["error"]["message"]
        assert await state.requests.all() == []  # nothing was asked to load
    finally:
        router.stop()


async def test_a_budget_shared_by_two_routers_stops_the_key_within_one_request(
    state: State, redis_url: str, tmp_path: Path, engines: Callable[..., EngineProcess]
) -> None:
    engine = engines(CHAT)
    await publish(state, engine, "p-chat", "chat")
    routers = [RouterProcess(redis_url, tmp_path, **router_env()) for _ in range(2)]
    try:
        for router in routers:
            await served(router, 1)
        budget = 100
        key = create_key(routers[0], name="budgeted", token_budget=budget)
        await wait_for(lambda: _answers(routers[1], key), 15, "the key on the second router")
        spent_before = sum(engine_tokens(engine))
        costs, refused = [], None
        for i in range(200):  # each request costs about 10 tokens: ~10 get through
            status, answer = chat(routers[i % 2], key, max_tokens=6)
            if status != 200:
                refused = (status, answer)
                break
            costs.append(answer["usage"]["total_tokens"])
        assert refused is not None, "the budget never stopped the key"
        status, answer = refused
        assert status == 429 and answer["error"]["code"] == "budget_exhausted", answer
        spent = sum(costs)
        # Stopped within one request: it had reached the budget, and the last request
        # it was let through began below it.
        assert spent >= budget
        assert spent - costs[-1] < budget, (spent, costs)
        # The engine agrees with the ledger, and the key stays stopped on both routers.
        assert sum(engine_tokens(engine)) - spent_before == spent
        for router in routers:
            status, _, body = http(
                "POST",
                router.url + "/v1/chat/completions",
                {"model": CHAT, "messages": [{"role": "user", "content": "x"}]},
                key=key,
            )
            assert status == 429, body
        _, headers, _ = http(
            "POST",
            routers[0].url + "/v1/chat/completions",
            {"model": CHAT, "messages": []},
            key=key,
        )
        midnight = (time.time() // 86400 + 1) * 86400
        assert abs(int(headers["Retry-After"]) - (midnight - time.time())) < 60
        assert spent_of(routers[1], "budgeted") == spent
    finally:
        for router in routers:
            router.stop()


def spent_of(router: RouterProcess, name: str) -> int:
    status, _, body = http("GET", f"{router.url}/admin/keys/{name}", key=ADMIN_KEY)
    assert status == 200, body
    return int(json.loads(body)["spent"])


async def _answers(router: RouterProcess, key: str) -> bool:
    """Does the router know `key` yet? (Asked where no token is spent.)"""
    return http("GET", router.url + "/v1/models", key=key)[0] == 200


async def test_usage_is_counted_exactly_streamed_or_not_and_the_added_chunk_removed(
    state: State, router: RouterProcess, engines: Callable[..., EngineProcess]
) -> None:
    chat_engine, embed_engine = engines(CHAT), engines(EMBED)
    await publish(state, chat_engine, "p-chat", "chat")
    await publish(state, embed_engine, "p-embed", "embedding")
    await served(router, 2)
    key = create_key(router, name="counted")
    await wait_for(lambda: _answers(router, key), 15, "the key in the router's table")
    before = engine_tokens(chat_engine), engine_tokens(embed_engine)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0)
    messages = [
        {"role": "system", "content": "be brief " * 40},
        {"role": "user", "content": "count the words of this line"},
    ]
    for _ in range(3):
        client.chat.completions.create(model=CHAT, messages=messages)  # type: ignore[arg-type]
        # A stream whose client did not ask for usage: the router asked, and took the
        # usage chunk back out.
        chunks = list(
            client.chat.completions.create(
                model=CHAT,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
            )
        )
        assert chunks and all(c.choices for c in chunks), "the usage chunk reached the client"
        assert all(c.usage is None for c in chunks)
        # One that asked: it keeps its usage chunk.
        asked = list(
            client.completions.create(
                model=CHAT,
                prompt="one two three",
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert asked[-1].usage is not None and asked[-1].choices == []
        client.embeddings.create(model=EMBED, input=["alpha beta", "gamma"])
    after = engine_tokens(chat_engine), engine_tokens(embed_engine)
    prompt = after[0][0] - before[0][0] + after[1][0] - before[1][0]
    completion = after[0][1] - before[0][1]

    async def recorded() -> bool:
        status, _, body = http("GET", router.url + "/admin/usage?key=counted", key=ADMIN_KEY)
        assert status == 200, body
        rows = json.loads(body)["usage"]
        return (
            sum(r["prompt_tokens"] for r in rows) == prompt
            and sum(r["completion_tokens"] for r in rows) == completion
            and sum(r["requests"] for r in rows) == 12
        )

    await wait_for(recorded, 15, f"usage of {prompt}+{completion} tokens recorded")
    # Usage and keys are the tenants' business: not for a read-only key, nor a client's.
    for path in ("/admin/usage", "/admin/keys/counted", "/admin/keys"):
        assert http("GET", router.url + path, key=READ_KEY)[0] == 401, path
        assert http("GET", router.url + path, key=key)[0] == 401, path
    with urllib.request.urlopen(router.url + "/metrics", timeout=10) as r:
        page = r.read().decode()
    counted = sum(
        float(v)
        for v in re.findall(
            r'^nebula_router_key_tokens_total\{key="counted",[^}]*\} (\S+)$', page, re.MULTILINE
        )
    )
    assert counted == prompt + completion


async def test_a_revocation_that_cannot_reach_every_router_does_not_happen(
    state: State, router: RouterProcess, engines: Callable[..., EngineProcess]
) -> None:
    await publish(state, engines(CHAT), "p-chat", "chat")
    await served(router, 1)
    key = create_key(router, name="to-revoke")
    await wait_for(lambda: _answers(router, key), 15, "the key in the router's table")
    # The routing version cannot be bumped (a stand-in for the second of two calls
    # failing): the old code deleted the key anyway, and routers never heard of it.
    version = await state.redis.get(redis_keys.ROUTING_VERSION)
    await state.redis.delete(redis_keys.ROUTING_VERSION)
    await state.redis.hset(redis_keys.ROUTING_VERSION, "x", "1")
    status, _, body = http("DELETE", router.url + "/admin/keys/to-revoke", key=ADMIN_KEY)
    assert status == 503, body
    assert await state.redis.hexists(redis_keys.API_KEYS, "to-revoke"), "half a revocation"
    await state.redis.delete(redis_keys.ROUTING_VERSION)
    await state.redis.set(redis_keys.ROUTING_VERSION, int(version or 0) + 1)
    status, _, body = http("DELETE", router.url + "/admin/keys/to-revoke", key=ADMIN_KEY)
    assert status == 200, body

    async def refused() -> bool:
        return chat(router, key)[0] == 401

    await wait_for(refused, 15, "the revoked key refused")


async def test_while_redis_is_away_each_router_stops_a_key_on_what_it_knows(
    state: State,
    router: RouterProcess,
    engines: Callable[..., EngineProcess],
    redis_server: RedisServer,
) -> None:
    await publish(state, engines(CHAT), "p-chat", "chat")
    await served(router, 1)
    budget = 120
    key = create_key(router, name="offline", token_budget=budget)
    await wait_for(lambda: _answers(router, key), 15, "the key in the router's table")
    costs = [chat(router, key, max_tokens=6)[1]["usage"]["total_tokens"] for _ in range(3)]
    redis_server.pause()
    try:
        refused = None
        for _ in range(100):
            status, answer = chat(router, key, max_tokens=6)
            if status != 200:
                refused = (status, answer)
                break
            costs.append(answer["usage"]["total_tokens"])
        assert refused is not None and refused[0] == 429, refused
        assert refused[1]["error"]["code"] == "budget_exhausted"
        # This router alone: it stopped the key within one request of the budget.
        assert sum(costs) >= budget and sum(costs) - costs[-1] < budget, costs
    finally:
        redis_server.resume()

    async def told() -> bool:  # what it spent while Redis was away is added
        return spent_of(router, "offline") == sum(costs)

    await wait_for(told, 30, f"{sum(costs)} tokens in Redis once it is back")


async def test_leaving_a_stream_before_its_end_is_no_way_around_a_budget(
    state: State, router: RouterProcess, engines: Callable[..., EngineProcess]
) -> None:
    # 40 words, 100 ms each: the client reads for a second, then leaves, before the
    # usage chunk that would have said what the answer cost.
    engine = engines(CHAT, "--tokens", "40", "--token-ms", "100")
    await publish(state, engine, "p-chat", "chat")
    await served(router, 1)
    key = create_key(router, name="leaver-2", token_budget=100_000)
    await wait_for(lambda: _answers(router, key), 15, "the key in the router's table")
    words = " ".join(f"w{i}" for i in range(40))
    body = {"model": CHAT, "stream": True, "messages": [{"role": "user", "content": words}]}
    for stream in (True, False):
        before = spent_of(router, "leaver-2")
        await clients.leave_after(router.url, {**body, "stream": stream}, 1.0, key)

        async def charged(before: int = before) -> bool:
            return spent_of(router, "leaver-2") > before

        await wait_for(charged, 15, f"a {'stream' if stream else 'request'} left, charged")
        spent = spent_of(router, "leaver-2") - before
        # An estimate: the body's bytes / 4, plus a token per event that reached the
        # client (none for a whole answer that never came).
        prompt = len(json.dumps({**body, "stream": stream}).encode()) // 4
        assert prompt <= spent <= prompt + 20, (stream, spent, prompt)

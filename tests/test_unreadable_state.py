"""One stored value nobody can read (a newer writer's status, phase or desired state,
or plain damage) never stops the scheduler or an agent, and what it names is left
as it is: through the real stack (scheduler, supervisord, agent, router; the test
engine) and a real redis-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from harness.cluster import Cluster, wait_for
from harness.processes import http_bytes
from nebula import redis_keys
from nebula.models import Status
from nebula.store import State


@pytest.fixture
async def cluster(redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(redis_url, tmp_path)
    yield c
    c.close()


async def test_unreadable_requests_and_placements_stop_nothing(
    state: State, cluster: Cluster
) -> None:
    router = cluster.start_router()
    chat = await cluster.load(state, "tiny_chat")
    await cluster.status(state, chat.id, Status.READY)
    [placement] = await state.placements.of_node("node-a")
    pid_before = {p: s.pid for p, s in (await state.placements.states("node-a")).items()}

    # A newer Nebula's values: a status, and a desired state, this one does not know.
    await state.redis.hset(redis_keys.request(chat.id), "status", "Hibernating")
    await state.redis.sadd(redis_keys.REQUESTS_DIRTY, chat.id)
    raw = json.loads(await state.redis.hget(redis_keys.placements("node-a"), placement.id))
    await state.redis.hset(
        redis_keys.placements("node-a"), placement.id, json.dumps({**raw, "desired": "hibernate"})
    )
    await state.redis.publish(redis_keys.node_channel("node-a"), "placements")
    # And plain damage in a placement state the scheduler reads.
    await state.redis.hset(redis_keys.placement_state("node-a"), "p-damaged", "{")
    await state.redis.sadd(redis_keys.PLACEMENT_STATE_DIRTY, "node-a")

    # The scheduler and the agent go on: another model loads and serves.
    embed = await cluster.load(state, "tiny_embedding")
    await cluster.status(state, embed.id, Status.READY, timeout=30)
    await answered(router.url + "/v1/embeddings", "tiny_embedding", input="x")

    # And what they could not read is left alone: the engine still runs (same pid) and
    # answers, the request keeps the value nobody here understands.
    states = await state.placements.states("node-a")
    assert states[placement.id].pid == pid_before[placement.id]
    messages = [{"role": "user", "content": "hi"}]
    await answered(router.url + "/v1/chat/completions", "tiny_chat", messages=messages)
    assert await state.redis.hget(redis_keys.request(chat.id), "status") == "Hibernating"
    assert await state.redis.hexists(redis_keys.placements("node-a"), placement.id)
    # Listing requests skips it, rather than failing.
    assert [r.id for r in await state.requests.all()] == [embed.id]
    assert "skipping a stored" in cluster.agent_log()
    assert "skipping a stored" in (cluster.folder / "scheduler.log").read_text()


async def answered(url: str, model: str, **body: object) -> None:
    """Wait for a 200 from `url` for `model` (the router's table follows within moments)."""

    async def check() -> bool:
        answer = await asyncio.to_thread(http_bytes, "POST", url, {"model": model, **body})
        return answer[0] == 200

    await wait_for(check, 20, f"a 200 from {model}")

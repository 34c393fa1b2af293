"""Precise prefix routing: engines say what their prefix cache evicted (vLLM's
KV-cache events), the node's agent tells the routers, and a conversation whose
prompt an engine evicted stops going there. The wire format against vLLM's own
encoder, the agent's mirror alone, then the whole path on a real cluster
(scheduler, node agent under supervisord, test engines that publish events as
vLLM does, a router), over real HTTP, ZMQ and Redis."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from harness import workloads
from harness.cluster import TEST_CATALOG, Cluster, wait_for
from nebula import kv_events, redis_keys
from nebula.agent.kv_watch import CacheMirror
from nebula.models import Endpoint, Status
from nebula.router.prefix import PrefixAffinity
from nebula.router.prompt_keys import with_session
from nebula.store import State

CATALOG = (
    TEST_CATALOG
    + """
[models.cached_chat]
model = "test/cached-chat"
engine = "test"
cpu_memory_gib = 1
engine_args = ["--cache-blocks", "120"]
"""
)


# vLLM's own classes encode a batch (in a process of its own: importing vLLM takes
# seconds and warns about torch).
VLLM_BATCH = """
import sys, msgspec
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
batch = KVEventBatch(ts=1.0, events=[
    BlockStored(block_hashes=[b"\\x01" * 32, b"\\x02" * 32], parent_block_hash=None,
                token_ids=list(range(32)), block_size=16, lora_id=None, medium="CPU",
                lora_name=None, session_id="nebula:r:1"),
    BlockRemoved(block_hashes=[b"\\x02" * 32], medium="CPU"),
    AllBlocksCleared(),
])
sys.stdout.write(msgspec.msgpack.encode(batch).hex())
"""


def test_events_read_as_vllm_writes_them() -> None:
    done = subprocess.run(
        [sys.executable, "-c", VLLM_BATCH], capture_output=True, text=True, timeout=300, check=True
    )
    payload = bytes.fromhex(done.stdout.strip().splitlines()[-1])
    events = kv_events.decode([b"kv", (7).to_bytes(8, "big"), payload])
    assert events == [
        kv_events.Stored([b"\x01" * 32, b"\x02" * 32], None, "nebula:r:1"),
        kv_events.Removed([b"\x02" * 32]),
        kv_events.Cleared(),
    ]
    # And what the test engine publishes reads the same way.
    assert kv_events.decode(kv_events.encode(8, events)) == events
    assert kv_events.decode([b"kv", b"\0" * 8, b"not msgpack"]) == []


def test_the_mirror_says_how_much_of_each_prompt_an_eviction_left() -> None:
    mirror = CacheMirror()
    blocks = [bytes([i]) for i in range(10)]
    lost, cleared = mirror.apply([kv_events.Stored(blocks[:4], None, "nebula:r:a")])
    assert (lost, cleared) == ({}, False)
    # Turn two: the first four blocks found cached (vLLM names them again), six new.
    mirror.apply(
        [
            kv_events.Stored(blocks[:4], None, "nebula:r:b"),
            kv_events.Stored(blocks[4:], blocks[3], "nebula:r:b"),
        ]
    )
    lost, _ = mirror.apply([kv_events.Removed([blocks[7], blocks[9]])])
    assert lost == {"nebula:r:b": 0.7}  # cached no further than block 7 of 10
    # A chain whose start it never saw has no known positions: ignored, not guessed.
    assert mirror.apply(
        [kv_events.Stored([b"x"], b"unknown", "nebula:r:c"), kv_events.Removed([b"x"])]
    ) == (
        {},
        False,
    )
    # A client's own session (not a router's, or too long to be one) is not followed.
    mirror.apply([kv_events.Stored([b"c1", b"c2"], None, "mine"),
                  kv_events.Stored([b"c3"], None, "nebula:" + "x" * 300)])  # fmt: skip
    assert mirror.apply([kv_events.Removed([b"c2", b"c3"])]) == ({}, False)
    assert "mine" not in mirror.lengths
    assert mirror.apply([kv_events.Cleared()]) == ({}, True)
    assert mirror.blocks == {}


def test_an_evicted_prompt_is_forgotten_and_its_next_turn_moves() -> None:
    policy = PrefixAffinity()
    reps = [
        Endpoint(f"p{i}", "r", "m", "n", f"http://127.0.0.1:{9000 + i}", "chat", True)
        for i in range(2)
    ]
    conv = [{"role": "system", "content": "notes " * 400}, {"role": "user", "content": "hi"}]
    prompt = policy.keys({"messages": conv})
    own = policy.choose(reps, {}, prompt).endpoint.placement_id
    policy.record(prompt, own)
    session = policy.tag(prompt)
    body = json.loads(with_session(json.dumps({"model": "m", "messages": conv}).encode(), session))
    assert body["session_id"] == session and body["messages"] == conv
    assert policy.keys(body).taggable is False  # a client's own session is left alone
    later = policy.keys(
        {
            "messages": [
                *conv,
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "more"},
            ]
        }
    )
    assert policy.choose(reps, {}, later).endpoint.placement_id == own
    policy.evicted(own, session, 0.0)  # the engine kept none of it
    moved = policy.choose(reps, {}, later)
    assert moved.endpoint.placement_id != own and moved.reason == "new"
    assert policy.take_outbox()[1] == {own: prompt.keys}  # shared with the other routers
    policy.evicted(own, "nebula:another-router:1", 0.0)  # not a session of this process


def fingerprint(url: str) -> str:
    with urllib.request.urlopen(url + "/test/stats", timeout=5) as r:
        return f"testengine-{json.load(r)['pid']}"


async def test_a_conversation_an_engine_evicted_goes_elsewhere_and_one_it_kept_stays(
    redis_url: str, tmp_path: Path, state: State
) -> None:
    cluster = Cluster(redis_url, tmp_path, catalog_text=CATALOG)
    try:
        request = await cluster.load(state, "cached_chat", 2)
        await cluster.status(state, request.id, Status.READY)
        endpoints = await state.endpoints.all()
        assert len(endpoints) == 2 and all(e.kv_events for e in endpoints)
        await wait_for(lambda: _following(cluster, 2), 20, "the agent to follow both engines")
        router = cluster.start_router()

        async def routed() -> bool:
            async with aiohttp.ClientSession() as s, s.get(router.url + "/health") as r:
                return (await r.json())["endpoints"] >= 2

        await wait_for(routed, 20, "the router to see both replicas")
        # Two users of one app (a shared system prompt): about 16 + 16 blocks each.
        first, second = workloads.shared_prompt(5, 2, 1000, 1000)
        turns = await workloads.converse([router.url], "cached_chat", [first, second], 1, 1)
        where = {t.conversation: t.replica for t in turns}
        assert where[0] != where[1], where  # the second spread to the idle replica
        evicting = next(e for e in endpoints if fingerprint(e.url) == where[0])

        # Someone else's prompts, straight to the first conversation's engine, fill its
        # cache (120 blocks) and evict the conversation and the shared prompt there.
        async with aiohttp.ClientSession() as session:
            for i in range(5):
                body = {
                    "model": "cached_chat",
                    "max_tokens": 2,
                    "messages": [
                        {"role": "user", "content": workloads.words(random.Random(i), 3000)}
                    ],
                }
                headers = {"Authorization": "Bearer engine-internal-key"}
                async with session.post(
                    evicting.url + "/v1/chat/completions", json=body, headers=headers
                ) as r:
                    assert r.status == 200, await r.text()

        async def router_dropped_it() -> bool:
            entries: Any = await state.redis.xrange(redis_keys.PREFIX_FEED)
            return any(
                f.get("o") == "drop" and f.get("p") == evicting.placement_id for _, f in entries
            )

        await wait_for(router_dropped_it, 20, "the router to learn of the eviction")
        later = await workloads.converse([router.url], "cached_chat", [first, second], 1, 1, seed=8)
        # workloads.converse numbers turns from 0 again: these are both conversations' second.
        moved = {t.conversation: t.replica for t in later}
        # Evicted there: it went where the longest part of it still is (the shared prompt).
        assert moved[0] != where[0], (where, moved)
        assert moved[1] == where[1], (where, moved)  # kept there: it stayed
    finally:
        cluster.close()


async def _following(cluster: Cluster, n: int) -> bool:
    await asyncio.sleep(0)
    return cluster.agent_log().count("following the KV-cache events of") >= n

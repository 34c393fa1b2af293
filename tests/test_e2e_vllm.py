"""End to end with real vLLM CPU engines: the scheduler, one node (supervisord and
agent), the router, and both default models of the catalog loaded at once.

Minutes, not seconds: each engine takes one to two minutes to start here.
Needs vLLM's CPU build and the prepared models; shell/test installs and
prepares both.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from harness import clients, workloads
from harness.cluster import ENGINE_KEY, Cluster, vllm_env, wait_for
from nebula import redis_keys
from nebula.agent.engine import running_requests
from nebula.agent.telemetry import memory_mib
from nebula.models import Status
from nebula.settings import Settings
from nebula.store import State

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

CHAT = "smollm2_135m_chat"
EMBED = "minilm_l6_embedding"


def vllm_processes() -> list[str]:
    """vLLM's API servers and the children they fork (named VLLM::EngineCore and so on)."""
    out = subprocess.run(
        ["pgrep", "-af", "vllm[.]entrypoints|VLLM::"], capture_output=True, text=True
    ).stdout
    # A zombie (`<defunct>`, not yet reaped by whatever adopted it) holds no memory.
    return [line for line in out.splitlines() if "<defunct>" not in line]


async def long_stream(url: str, first: asyncio.Event) -> tuple[int, bool]:
    """A streamed answer of 300 tokens through the router: (chunks, ended with [DONE])."""
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 300,
        "ignore_eos": True,  # vLLM's: exactly max_tokens, so the stream is long
        "stream": True,
    }
    chunks, done = 0, False
    timeout = aiohttp.ClientTimeout(total=900)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: "):
                assert b'"error"' not in line, line
                chunks += 1
                first.set()
    return chunks, done


# A busy loop that stops itself (bounded) if the test is killed before it kills it.
BUSY_LOOP = [
    sys.executable,
    "-c",
    "import time\nend = time.time() + 900\nwhile time.time() < end: pass",
]


def engine_requests(target: str) -> int:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=30) as r:
        return running_requests(r.read().decode())


async def leave_after(url: str, stream: bool, seconds: float) -> None:
    """Ask for a 1,500-token answer, then go away after `seconds`."""
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": stream,
    }
    await clients.leave_after(url, body, seconds)


def engine_tokens(target: str) -> int:
    """vLLM's own count of the tokens it took in and gave out."""
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=30) as r:
        text = r.read().decode()
    total = 0.0
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        total += sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))
    return int(total)


def recorded_tokens(router_url: str) -> int:
    """What the router recorded (an open router counts under the key "open")."""
    with urllib.request.urlopen(router_url + "/admin/usage?key=open", timeout=10) as r:
        return sum(row["total_tokens"] for row in json.load(r)["usage"])


async def usage_matches_the_engines(router_url: str, chat_target: str) -> int:
    """Usage counted per key equals vLLM's own counters, streamed or not; the usage
    chunk the router asked for never reaches a client that did not ask."""
    await asyncio.sleep(2.5)  # the usage of earlier answers is written
    engine_before, recorded_before = engine_tokens(chat_target), recorded_tokens(router_url)
    with openai.OpenAI(base_url=router_url + "/v1", api_key="unused") as via:
        whole = via.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=12
        )
        chunks = list(
            via.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "Count to five."}],
                max_tokens=20, stream=True,
            )
        )  # fmt: skip
        assert chunks and all(c.choices and c.usage is None for c in chunks)
        asked = list(
            via.completions.create(
                model=CHAT, prompt="The sky is", max_tokens=8, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        assert asked[-1].usage is not None and asked[-1].choices == []
        embedded = via.embeddings.create(model=EMBED, input=["a cat", "a dog"])
    assert whole.usage is not None and embedded.usage is not None
    expected = engine_tokens(chat_target) - engine_before + embedded.usage.total_tokens

    async def counted() -> bool:
        return recorded_tokens(router_url) - recorded_before == expected

    await wait_for(counted, 20, f"{expected} tokens recorded, as the engines counted")
    return expected


async def abandoned_answers_leave_the_engine_idle(url: str, target: str) -> float:
    """4 non-streamed and 4 streamed answers, abandoned after 2 s: vLLM aborts a request
    whose connection closes, and the router passes the leaving on. Seconds from the
    clients leaving to the engine idle (the answers would have run for minutes)."""
    await asyncio.gather(*(leave_after(url, stream, 2.0) for stream in [False, True] * 4))
    left = time.monotonic()
    deadline = left + 60
    while await asyncio.to_thread(engine_requests, target):
        assert time.monotonic() < deadline, "the engine still works for clients that left"
        await asyncio.sleep(0.1)
    return time.monotonic() - left


async def test_both_default_models_on_vllm_cpu(
    state: State, redis_url: str, tmp_path: Path
) -> None:
    models_dir = Settings().models_dir
    catalog = (Path(__file__).parents[1] / "nebula" / "catalog.toml").read_text()
    before = vllm_processes()
    assert not before, f"vLLM processes already running: {before}"
    _, available_before = memory_mib()
    cluster = Cluster(
        redis_url,
        tmp_path,
        catalog_text=catalog,
        extra_env={
            "NEBULA_MODELS_DIR": str(models_dir),
            "NEBULA_PROBE_INTERVAL_S": "1",
            "NEBULA_ENGINE_START_TIMEOUT_S": "900",
            # The default (the test cluster's is 15 s): the unload below must wait for
            # every answer, however busy the machine.
            "NEBULA_DRAIN_TIMEOUT_S": "600",
        },
    )
    try:
        router = cluster.start_router()
        started = time.monotonic()
        chat_request = await cluster.load(state, CHAT)
        embed_request = await cluster.load(state, EMBED)
        ready_at: dict[str, float] = {}

        async def ready(request_id: str) -> None:
            await cluster.status(state, request_id, Status.READY, timeout=900)
            ready_at[request_id] = time.monotonic() - started

        await asyncio.gather(ready(chat_request.id), ready(embed_request.id))
        endpoints = {e.model: e for e in (await state.endpoints.all())}
        assert set(endpoints) == {CHAT, EMBED}

        # At the endpoints the agent published.
        chat_api = openai.OpenAI(base_url=endpoints[CHAT].url + "/v1", api_key=ENGINE_KEY)
        answer = chat_api.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30,
        )
        text = answer.choices[0].message.content or ""
        assert text.strip() and answer.choices[0].finish_reason in ("stop", "length")
        stream = chat_api.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Say hello."}], max_tokens=20,
            stream=True,
        )  # fmt: skip
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(pieces) > 2 and "".join(pieces).strip()
        embed_api = openai.OpenAI(base_url=endpoints[EMBED].url + "/v1", api_key=ENGINE_KEY)
        vectors = embed_api.embeddings.create(model=EMBED, input=["a cat", "a dog"])
        assert [len(v.embedding) for v in vectors.data] == [384, 384]

        # And through the router, by the `model` field.
        via = openai.OpenAI(base_url=router.url + "/v1", api_key="unused")
        routed = via.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=10
        )
        assert routed.choices[0].message.content
        assert len(via.embeddings.create(model=EMBED, input="x").data[0].embedding) == 384
        # vLLM's own metrics, found through the discovery endpoint Prometheus uses.
        with urllib.request.urlopen(router.url + "/admin/sd", timeout=10) as r:
            groups = json.load(r)
        engines = {g["labels"]["model"]: g["targets"][0] for g in groups
                   if g["labels"]["nebula_component"] == "engine"}  # fmt: skip
        assert set(engines) == {CHAT, EMBED}
        assert {g["labels"]["nebula_component"] for g in groups} >= {"scheduler", "agent", "router"}
        for model, target in engines.items():
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as r:
                text = r.read().decode()
            for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
                assert re.search(rf'^{name}{{[^}}]*model_name="{model}"', text, re.M), (model, name)
        running = vllm_processes()
        assert running, "no vLLM process while both models were Ready"
        for api in (chat_api, embed_api, via):
            api.close()
        counted = await usage_matches_the_engines(router.url, engines[CHAT])

        # Clients that leave take their work with them, streamed or not.
        idle_s = await abandoned_answers_leave_the_engine_idle(router.url, engines[CHAT])

        # Unload while three long answers stream through the router, with two busy loops
        # saturating the CPU (an engine too busy to answer its metrics in time is not
        # idle): the drain waits for them (the default drain timeout, 600 s, covers any
        # answer the router waits for), so every one ends with [DONE], none is cut.
        busy = [subprocess.Popen(BUSY_LOOP) for _ in range(2)]
        try:
            started = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.create_task(long_stream(router.url, first)) for first in started]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
            unload_started = time.monotonic()
            await state.requests.unload(chat_request.id)
            await state.requests.unload(embed_request.id)
            answers = await asyncio.gather(*streams)
            streamed_s = time.monotonic() - unload_started
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
        for chunks, done in answers:
            assert done, f"a stream was cut after {chunks} chunks"
            assert chunks >= 250, f"only {chunks} chunks"  # ~300 tokens, ignore_eos
        await cluster.gone(state, chat_request.id, timeout=300)
        await cluster.gone(state, embed_request.id, timeout=300)
        unload_s = time.monotonic() - unload_started
        deadline = time.monotonic() + 30
        while vllm_processes() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert vllm_processes() == []
        gone_s = time.monotonic() - unload_started
        _, available_after = memory_mib()
        # Within 1 GiB of where it started (page cache and allocator noise aside).
        assert available_after > available_before - 1024, (available_before, available_after)
        print(
            f"\nvLLM CPU: {CHAT} Ready in {ready_at[chat_request.id]:.0f}s, "
            f"{EMBED} Ready in {ready_at[embed_request.id]:.0f}s (loaded together); "
            f"usage: {counted} tokens counted as vLLM counted them; "
            f"8 abandoned answers: engine idle {idle_s:.1f}s after the clients left; "
            f"3 streams of 300 tokens finished {streamed_s:.1f}s into the unload "
            "(2 busy loops running); "
            f"unload -> gone {unload_s:.1f}s, last vLLM process gone {gone_s:.1f}s; "
            f"RAM available {available_before} MiB before, {available_after} MiB after"
        )
    finally:
        cluster.close()


async def test_a_model_nobody_loaded_answers_its_first_request_on_vllm_cpu(
    state: State, redis_url: str, tmp_path: Path
) -> None:
    """Load on demand, for real: nothing is loaded; the official client asks for a chat
    completion (with a timeout long enough for vLLM's start) and gets the answer."""
    before = vllm_processes()
    assert not before, f"vLLM processes already running: {before}"
    catalog = (Path(__file__).parents[1] / "nebula" / "catalog.toml").read_text()
    cluster = Cluster(
        redis_url,
        tmp_path,
        catalog_text=catalog,
        extra_env=vllm_env(NEBULA_ON_DEMAND="true"),
    )
    try:
        router = cluster.start_router()
        assert await state.requests.all() == []
        started = time.monotonic()
        with openai.OpenAI(
            base_url=router.url + "/v1", api_key="unused", timeout=900, max_retries=0
        ) as api:
            answer = await asyncio.to_thread(
                api.chat.completions.create,
                model=CHAT,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=20,
            )
        first_answer_s = time.monotonic() - started
        assert (answer.choices[0].message.content or "").strip()
        [request] = await state.requests.all()
        assert request.model == CHAT and request.on_demand and not request.pinned
        await state.requests.unload(request.id)
        await cluster.gone(state, request.id, timeout=300)
        print(f"\nvLLM CPU on demand: first answer {first_answer_s:.0f}s after the request")
    finally:
        cluster.close()


async def test_vllm_reports_what_it_evicted_and_the_router_forgets_it(
    state: State, redis_url: str, tmp_path: Path
) -> None:
    """Precise prefix routing on real vLLM: a cache of 24 blocks of 128 tokens, one
    conversation, then prompts enough to evict it. vLLM's KV-cache events name the
    router's session; the agent reports the eviction; the router drops those keys."""

    # The test before stopped its engines; vLLM's worker processes take a moment to go.
    async def none_left() -> bool:
        await asyncio.sleep(0)
        return not vllm_processes()

    await wait_for(none_left, 120, f"no vLLM processes (running: {vllm_processes()})")
    catalog = (Path(__file__).parents[1] / "nebula" / "catalog.toml").read_text()
    catalog = catalog.replace(
        'engine_args = ["--max-model-len", "2048", "--enforce-eager"]',
        'engine_args = ["--max-model-len", "2048", "--enforce-eager", '
        '"--num-gpu-blocks-override", "24"]',
    )
    cluster = Cluster(redis_url, tmp_path, catalog_text=catalog, extra_env=vllm_env())
    try:
        request = await cluster.load(state, CHAT)
        await cluster.status(state, request.id, Status.READY, timeout=900)
        [endpoint] = await state.endpoints.all()
        assert endpoint.kv_events
        await wait_for(lambda: _following(cluster), 30, "the agent to follow the engine")
        router = cluster.start_router()
        await wait_for(lambda: _routed(router.url), 30, "the router to see the replica")
        # One conversation (3 blocks), then five other prompts (7 blocks each).
        await workloads.converse([router.url], CHAT, workloads.own_prompts(7, 1, 2500), 1, 1)
        await workloads.converse([router.url], CHAT, workloads.own_prompts(8, 5, 6000), 1, 1)

        async def evicted_and_dropped() -> bool:
            entries: Any = await state.redis.xrange(redis_keys.PREFIX_FEED)
            ops = {f.get("o") for _, f in entries if f.get("p") == endpoint.placement_id}
            return {"evict", "drop"} <= ops

        await wait_for(evicted_and_dropped, 60, "vLLM's eviction to reach the router")
    finally:
        cluster.close()


async def _following(cluster: Cluster) -> bool:
    await asyncio.sleep(0)
    return "following the KV-cache events of" in cluster.agent_log()


async def _routed(url: str) -> bool:
    async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
        return bool((await r.json())["endpoints"])

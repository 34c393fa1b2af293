"""The router's per-request metrics (router/tally.py) are exact across workers: after
concurrent chats, streams and embeddings through a router of 2 workers, every
counter equals what was sent, and the tokens equal the engine's own counters."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from harness.endpoints import announce, known_by_every_worker
from harness.metrics import metric
from harness.processes import EngineProcess, RouterProcess, http_bytes, stop
from nebula.models import Endpoint
from nebula.store import State

CHAT = "smollm2_135m_chat"
EMBED = "minilm_l6_embedding"
KEY = "sk-metrics"
CHATS, STREAMS, EMBEDDINGS = 40, 24, 16


def engine_counter(engine: EngineProcess, name: str) -> int:
    _, _, text = http_bytes("GET", engine.url + "/metrics")
    found = re.search(rb"^" + re.escape(name.encode()) + rb"\{[^}]*\} (\d+)", text, re.M)
    assert found is not None, name
    return int(found.group(1))


async def test_counts_across_two_workers_equal_what_was_sent(
    state: State, redis_url: str, tmp_path: Path
) -> None:
    chat_engine = EngineProcess(CHAT, tmp_path)
    embed_engine = EngineProcess(EMBED, tmp_path)
    router = RouterProcess(redis_url, tmp_path, workers=2, NEBULA_API_KEYS=KEY)
    try:
        for engine, task in ((chat_engine, "chat"), (embed_engine, "embedding")):
            endpoint = Endpoint(f"p-{task}", f"r-{task}", engine.model, "n1", engine.url, task)
            await announce(state, endpoint)
        url = router.url
        await known_by_every_worker(url, endpoints=2)

        def send(route: str, body: dict) -> int:  # type: ignore[type-arg]
            return http_bytes("POST", url + route, body, KEY)[0]

        chat, embed = "/v1/chat/completions", "/v1/embeddings"
        sends = [
            *((chat, _body(CHAT, chat, i)) for i in range(CHATS)),
            *((chat, _body(CHAT, chat, i, stream=True)) for i in range(STREAMS)),
            *((embed, _body(EMBED, embed, i)) for i in range(EMBEDDINGS)),
        ]
        statuses = await asyncio.gather(*(asyncio.to_thread(send, r, b) for r, b in sends))
        assert set(statuses) == {200}
        _, _, raw = http_bytes("GET", url + "/metrics", key=KEY)
        text = raw.decode()
        chats = CHATS + STREAMS
        assert metric(text, "nebula_router_requests_total", model=CHAT, status="200") == chats
        assert metric(text, "nebula_router_requests_total", model=EMBED) == EMBEDDINGS
        assert metric(text, "nebula_router_request_duration_seconds_count", model=CHAT) == chats
        assert metric(text, "nebula_router_time_to_first_token_seconds_count") == STREAMS
        assert metric(text, "nebula_router_routing_decisions_total", model=CHAT) == chats
        for kind, counter in (
            ("completion", "vllm:generation_tokens_total"),
            ("prompt", "vllm:prompt_tokens_total"),
        ):
            counted = metric(text, "nebula_router_tokens_total", model=CHAT, kind=kind)
            assert counted == engine_counter(chat_engine, counter), kind
        by_key = metric(text, "nebula_router_key_tokens_total", model=CHAT)
        assert by_key == metric(text, "nebula_router_tokens_total", model=CHAT)
    finally:
        assert router.stop() == 0
        stop(chat_engine.proc)
        stop(embed_engine.proc)


def _body(model: str, route: str, i: int = 0, *, stream: bool = False) -> dict:  # type: ignore[type-arg]
    if route == "/v1/embeddings":
        return {"model": model, "input": [f"sentence {i}", "another one"]}
    words = " ".join(f"w{j}" for j in range(i % 7 + 1))
    return {"model": model, "messages": [{"role": "user", "content": words}], "stream": stream}

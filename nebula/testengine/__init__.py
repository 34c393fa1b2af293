"""A small OpenAI-compatible engine for fast tests of routing and lifecycle.

It speaks the part of vLLM's OpenAI server that Nebula relies on (chat and
text completions, streamed or not, embeddings, `/v1/models`, `/health`, and
vLLM's own `vllm:num_requests_running` metric), starts in well under a second,
and can be told to be slow, to fail or to die. It never stands in for vLLM in
the end-to-end tests.

    python -m nebula.testengine --port 8100 --model NAME [--api-key KEY]

Behaviour is set by flags at start and changed at run time by
`POST /test/behaviour` with a JSON object of the `Behaviour` fields.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from nebula import kv_events
from nebula.testengine import prompts, vllm_metrics
from nebula.testengine.answers import Answer
from nebula.testengine.kv_publisher import EventPublisher
from nebula.testengine.prompts import CACHE_BLOCKS, CHARS_PER_TOKEN, cached_prefix, prompt_text

WAIT_POLL_S = 0.005


@dataclass
class Behaviour:
    chunk_delay_ms: float = 0.0  # between streamed chunks
    delay_ms: float = 0.0  # before any answer
    fail_status: int | None = None  # answer every API call with this HTTP status
    fail_plain: bool = False  # ...as a plain-text page (a proxy's, a crashed server's)
    die_after_chunks: int | None = None  # exit the process mid-stream, after N chunks
    unhealthy: bool = False  # /health answers 503
    tokens: int = 8  # the most words in an answer (max_tokens lowers it)
    # A prefix cache like vLLM's: the first byte waits this long per 1,000 characters of
    # the prompt that are not cached yet (0: no delay; the cache is kept either way).
    prefill_ms_per_kchar: float = 0.0
    # Generation time per token of the answer, streamed or not (vLLM's decode steps):
    # before each streamed event after the first, `usage` and `[DONE]` included.
    token_ms: float = 0.0
    metrics_delay_ms: float = 0.0  # /metrics answers this late (a busy engine)
    hide_running: bool = False  # /metrics says 0 running (a request not queued yet)
    # vLLM's --max-num-seqs: past this many running, requests wait (num_requests_waiting).
    max_running: int = 0  # 0: no limit
    cache_blocks: int = CACHE_BLOCKS  # the prefix cache's size; the least recent go first


BEHAVIOUR = web.AppKey("behaviour", Behaviour)
RUNNING = web.AppKey("running", list)  # [requests in progress, requests waiting]
SERVED = web.AppKey("served", list)  # one-element list: /v1 requests that reached us
TOKENS = web.AppKey("tokens", list)  # [prompt, generation] tokens, like vLLM's counters
MODEL = web.AppKey("model", str)
API_KEY = web.AppKey("api_key", str)
DIMENSIONS = web.AppKey("dimensions", int)
PREFIX_CACHE = web.AppKey("prefix_cache", dict)  # block hash -> None, oldest first (LRU)
PREFIX_STATS = web.AppKey("prefix_stats", list)  # [characters hit, characters queried]


EVENTS = web.AppKey("events", EventPublisher)  # (absent: no events published)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}}, status=status
    )


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    if not request.path.startswith("/v1/"):
        return await handler(request)
    app[SERVED][0] += 1
    key = app[API_KEY]
    if key and request.headers.get("Authorization") != f"Bearer {key}":
        return web.json_response({"error": "Unauthorized"}, status=401)
    behaviour = app[BEHAVIOUR]
    if behaviour.delay_ms:
        await asyncio.sleep(behaviour.delay_ms / 1000)
    if behaviour.fail_status and behaviour.fail_plain:
        return web.Response(status=behaviour.fail_status, text="Internal Server Error")
    if behaviour.fail_status:
        return _error(behaviour.fail_status, "the test engine was told to fail", "server_error")
    counts = app[RUNNING]
    if behaviour.max_running and counts[0] >= behaviour.max_running:
        counts[1] += 1  # like vLLM's num_requests_waiting
        try:
            while behaviour.max_running and counts[0] >= behaviour.max_running:
                await asyncio.sleep(WAIT_POLL_S)
        finally:
            counts[1] -= 1
    counts[0] += 1  # API requests in progress, like vLLM's num_requests_running
    try:
        return await handler(request)
    finally:
        counts[0] -= 1


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"bad JSON: {exc}") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    if body.get("model") != request.app[MODEL]:
        raise web.HTTPNotFound(
            text=json.dumps(
                {
                    "error": {
                        "message": f"The model `{body.get('model')}` does not exist.",
                        "type": "NotFoundError",
                        "code": 404,
                    }
                }
            ),
            content_type="application/json",
        )
    return body


def _words(text: str, limit: int) -> list[str]:
    words = ("echo: " + text).split()
    return [w + " " for w in words[:limit]] or ["… "]


async def _prefill(app: web.Application, body: dict[str, Any], chat: bool) -> tuple[int, int]:
    """The prefix cache: count the prompt's cached leading blocks, wait for the rest.
    Returns the prompt's tokens and how many of them were cached (4 characters a
    token, so a block of 64 characters is vLLM's 16 tokens)."""
    text = prompt_text(body, chat)
    hit, blocks, evicted = cached_prefix(app[PREFIX_CACHE], text, app[BEHAVIOUR].cache_blocks)
    if EVENTS in app:  # as vLLM: the blocks this request used, then the evicted
        session = body.get("session_id")
        app[EVENTS].publish(
            [
                kv_events.Stored(
                    [bytes.fromhex(b) for b in blocks],
                    None,
                    session if isinstance(session, str) else None,
                ),
                kv_events.Removed([bytes.fromhex(b) for b in evicted]),
            ]
        )
    app[PREFIX_STATS][0] += hit
    app[PREFIX_STATS][1] += len(text)
    per_kchar = app[BEHAVIOUR].prefill_ms_per_kchar
    if per_kchar:
        await asyncio.sleep((len(text) - hit) / 1000 * per_kchar / 1000)
    return max(1, len(text) // CHARS_PER_TOKEN), hit // CHARS_PER_TOKEN


async def _answer(request: web.Request, *, chat: bool) -> web.StreamResponse:
    body = await _body(request)
    invalid = prompts.invalid(body, chat)
    if invalid is not None:
        return _error(400, invalid, "BadRequestError")
    app = request.app
    behaviour = app[BEHAVIOUR]
    prompt_tokens, cached_tokens = await _prefill(app, body, chat)
    limit = min(int(body.get("max_tokens") or behaviour.tokens), behaviour.tokens)
    if chat:
        messages = body.get("messages") or []
        prompt = str(messages[-1].get("content", "")) if messages else ""
    else:
        prompt = str(body.get("prompt", ""))
    words = _words(prompt, limit)
    app[TOKENS][0] += prompt_tokens
    app[TOKENS][1] += len(words)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(words),
        "total_tokens": prompt_tokens + len(words),
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    finish = "length" if len(("echo: " + prompt).split()) > limit else "stop"
    answer = Answer(chat, app[MODEL], words, finish, usage)
    if not body.get("stream"):
        await asyncio.sleep(behaviour.token_ms * len(words) / 1000)
        return web.json_response(answer.whole())
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return await _stream(request, answer, behaviour, with_usage)


async def _stream(
    request: web.Request, answer: Answer, behaviour: Behaviour, with_usage: bool
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    sent_events = 0

    async def send(payload: dict[str, Any] | str) -> None:
        nonlocal sent_events
        if behaviour.token_ms and sent_events:
            await asyncio.sleep(behaviour.token_ms / 1000)
        sent_events += 1
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    if answer.chat:
        first = answer.chunk(None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        await send(first)
    for sent, word in enumerate(answer.words):
        if behaviour.die_after_chunks is not None and sent >= behaviour.die_after_chunks:
            os._exit(17)  # a crash mid-stream, without goodbye
        if behaviour.chunk_delay_ms and sent:
            await asyncio.sleep(behaviour.chunk_delay_ms / 1000)
        await send(answer.chunk(word))
    await send(answer.chunk(None, answer.finish))
    if with_usage:
        await send({**answer.chunk(None), "choices": [], "usage": answer.usage})
    await send("[DONE]")
    await response.write_eof()
    return response


async def chat(request: web.Request) -> web.StreamResponse:
    return await _answer(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _answer(request, chat=False)


def _vector(text: str, dimensions: int) -> list[float]:
    seed = hashlib.sha256(text.encode()).digest()
    raw = [((seed[i % 32] + i * 7) % 251) / 125.0 - 1.0 for i in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


async def embeddings(request: web.Request) -> web.Response:
    body = await _body(request)
    inputs = body.get("input")
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return _error(400, "input must be a string or a list of strings")
    dims = request.app[DIMENSIONS]
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(t, dims)}
        for i, t in enumerate(texts)
    ]
    tokens = sum(len(t.split()) for t in texts)
    request.app[TOKENS][0] += tokens  # vLLM counts a pooling request's prompt too
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": request.app[MODEL],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def models(request: web.Request) -> web.Response:
    model = request.app[MODEL]
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "nebula-test"}],
        }
    )


async def health(request: web.Request) -> web.Response:
    if request.app[BEHAVIOUR].unhealthy:
        return web.Response(status=503)
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    behaviour = request.app[BEHAVIOUR]
    if behaviour.metrics_delay_ms:
        await asyncio.sleep(behaviour.metrics_delay_ms / 1000)
    running, waiting = request.app[RUNNING]
    text = vllm_metrics.exposition(
        request.app[MODEL],
        0 if behaviour.hide_running else running,
        waiting,
        request.app[TOKENS],
        request.app[PREFIX_STATS],
    )
    return web.Response(text=text, content_type="text/plain")


async def stats(request: web.Request) -> web.Response:
    hit, queried = request.app[PREFIX_STATS]
    return web.json_response(
        {
            "served": request.app[SERVED][0],
            "pid": os.getpid(),
            "prefix_hit_chars": hit,
            "prefix_query_chars": queried,
        }
    )


async def set_behaviour(request: web.Request) -> web.Response:
    changes = await request.json()
    behaviour = request.app[BEHAVIOUR]
    names = {f.name for f in fields(Behaviour)}
    unknown = set(changes) - names
    if unknown:
        return _error(400, f"unknown behaviour fields: {', '.join(sorted(unknown))}")
    for name, value in changes.items():
        setattr(behaviour, name, value)
    return web.json_response(asdict(behaviour))


def make_app(
    model: str,
    *,
    api_key: str = "",
    dimensions: int = 384,
    behaviour: Behaviour | None = None,
    kv_events_config: str = "",
) -> web.Application:
    app = web.Application(middlewares=[_guard])
    app[MODEL] = model
    app[API_KEY] = api_key
    app[DIMENSIONS] = dimensions
    app[BEHAVIOUR] = behaviour or Behaviour()
    app[RUNNING] = [0, 0]
    app[SERVED] = [0]
    app[PREFIX_CACHE] = {}
    app[PREFIX_STATS] = [0, 0]
    if kv_events_config:
        app[EVENTS] = EventPublisher(kv_events_config)
    app[TOKENS] = [0, 0]
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/test/behaviour", set_behaviour)
    app.router.add_get("/test/stats", stats)
    return app

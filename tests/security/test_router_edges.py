"""The router's edges, each as a client or an admin would hit them over real HTTP:
paths that try to reach an engine's private routes, metric labels a client could
multiply, logs a client could fill or read keys from, auth that could fail open,
rate limits per process, error pages not in OpenAI's shape, and key scopes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import openai
import pytest
from yarl import URL

from harness.cluster import wait_for
from harness.processes import EngineProcess, RedisServer, RouterProcess, http_bytes
from nebula.store import State
from tests.security.conftest import (
    ADMIN_KEY,
    CHAT,
    CLIENT_KEY,
    EMBED,
    READ_KEY,
    SECRETS,
    publish,
    raw_http,
    router_env,
    status_of,
)


def http(
    method: str, url: str, body: object = None, key: str | None = CLIENT_KEY, raw: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    return http_bytes(method, url, body, key, raw or None)


def openai_error(body: bytes) -> dict[str, object]:
    """The `error` object of an OpenAI-shaped error body (fails if it is not one)."""
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "code"} and err["message"], err
    return err  # type: ignore[no-any-return]


async def served(router: RouterProcess, count: int) -> None:
    async def check() -> bool:
        status, _, body = http("GET", router.url + "/health")
        return status == 200 and json.loads(body)["endpoints"] >= count

    await wait_for(check, 15, f"{count} endpoint(s) in the router's table")


CHAT_BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}


async def test_dot_segments_and_encoded_slashes_never_reach_an_engine(
    state: State, router: RouterProcess, engines: Callable[..., EngineProcess]
) -> None:
    engine = engines(CHAT)
    await publish(state, engine, "p-chat", "chat")
    await served(router, 1)
    body = json.dumps({"model": CHAT, "unhealthy": True, "fail_status": 500}).encode()
    paths = [
        "/v1/../test/behaviour",
        "/v1/%2e%2e/test/behaviour",
        "/v1/%2E%2E/test/behaviour",
        "/v1/chat/completions/../../test/behaviour",
        "/v1/..%2ftest/behaviour",
        "/v1/.%2e/metrics",
        "/v1/../metrics",
        "/v1/./chat/completions",
        "/v1/chat%2fcompletions",
        "/v1/../admin/models",
    ]
    for path in paths:
        request = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body
        answer = raw_http(router.port, request)
        assert status_of(answer) in (400, 404), (path, answer[:200])
        _head, _, payload = answer.partition(b"\r\n\r\n")
        openai_error(payload)
        assert b"vllm:" not in payload and b"served" not in payload
    # The engine saw none of it: its behaviour is unchanged and it still answers.
    with urllib.request.urlopen(engine.url + "/health", timeout=5) as r:
        assert r.status == 200
    assert engine.served() == 0
    status, _, answer = http("POST", router.url + "/v1/chat/completions", CHAT_BODY)
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"]


def series(router: RouterProcess) -> int:
    with urllib.request.urlopen(router.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return len(re.findall(r"^nebula_router_\w+\{", text, re.MULTILINE))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def flood(router: RouterProcess, count: int, seed: int) -> None:
    """`count` requests with no key to random paths, 16 at a time."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_."
    paths = []
    for _ in range(count):
        tail = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        paths.append(rng.choice(["/v1/", "/v1/x/", "/", "/admin/", "/v2/"]) + tail)
    queue = iter(paths)
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for path in queue:
                method = rng.choice(["GET", "POST"])
                url = URL(router.url + path, encoded=True)
                async with session.request(method, url, data=b"{}") as r:
                    await r.read()
                    assert 400 <= r.status < 500, (path, r.status)

        await asyncio.gather(*(worker() for _ in range(16)))


@pytest.mark.timeout(240)
async def test_random_unauthenticated_paths_leave_series_and_memory_flat(
    router: RouterProcess,
) -> None:
    # Warm up the allocator, the caches and every fixed series a client without a key
    # can reach: 401 (unauthenticated), and 400, 404, 405 for paths nothing serves.
    for method, path in [("POST", "/v1/chat/completions"), ("POST", "/v1/./x"),
                         ("POST", "/v1/models"), ("GET", "/v1/nothing")]:  # fmt: skip
        http(method, router.url + path, {}, key=None)
    await flood(router, 500, seed=1)
    before_series, before_rss = series(router), rss_kib(router.proc.pid)
    await flood(router, 10_000, seed=2)
    after_series, after_rss = series(router), rss_kib(router.proc.pid)
    assert after_series == before_series, "client paths became metric series"
    grown_mib = (after_rss - before_rss) / 1024
    print(f"router RSS grew {grown_mib:.2f} MiB over 10,000 requests")
    assert grown_mib < 16, f"the router grew {grown_mib:.1f} MiB over 10,000 requests"


MALFORMED = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\x00\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer %s\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Key: %s\r\nBad\x01Header: y\r\n\r\n",
    b"GET /v1/models?k=%s HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
]


async def test_malformed_requests_are_answered_in_shape_and_logged_without_secrets(
    router: RouterProcess,
) -> None:
    for _ in range(50):  # 200 malformed requests: a client trying to fill the log
        for template in MALFORMED:
            answer = raw_http(router.port, template % CLIENT_KEY.encode())
            assert status_of(answer) == 400
            assert openai_error(answer.partition(b"\r\n\r\n")[2])["code"] == "bad_http"
            assert CLIENT_KEY.encode() not in answer
    log = router.log.read_text()
    for secret in SECRETS:
        assert secret not in log
    lines = [line for line in log.splitlines() if "malformed HTTP request" in line]
    assert 1 <= len(lines) <= 3, lines  # one line per interval, not one per request
    assert "Traceback" not in log


async def test_deleting_the_last_key_closes_a_router_beyond_loopback(
    state: State, redis_url: str, tmp_path: Path, engines: Callable[..., EngineProcess]
) -> None:
    await state.api_keys.create("only-key", None)
    env = router_env(NEBULA_ROUTER_HOST="0.0.0.0")  # beyond loopback; tests use 127.0.0.1
    del env["NEBULA_API_KEYS"]
    router = RouterProcess(redis_url, tmp_path, **env)
    try:
        engine = engines(CHAT)
        await publish(state, engine, "p-chat", "chat")
        await served(router, 1)
        assert http("POST", router.url + "/v1/chat/completions", CHAT_BODY, key=None)[0] == 401
        status, _, _ = http("DELETE", router.url + "/admin/keys/only-key", key=ADMIN_KEY)
        assert status == 200
        refreshed = time.time()

        async def table_after_delete() -> bool:
            _, _, body = http("GET", router.url + "/health")
            return json.loads(body)["table_age_s"] < time.time() - refreshed

        await wait_for(table_after_delete, 10, "a routing table read after the delete")
        for _ in range(5):
            status, _, body = http("POST", router.url + "/v1/chat/completions", CHAT_BODY, key=None)
            assert status == 401, body
            assert http("GET", router.url + "/v1/models", key=None)[0] == 401
            await asyncio.sleep(0.2)
        assert engine.served() == 0
    finally:
        router.stop()


async def test_every_error_is_in_openai_shape(
    state: State, router: RouterProcess, engines: Callable[..., EngineProcess]
) -> None:
    chat, embed = engines(CHAT), engines(EMBED)
    await publish(state, chat, "p-chat", "chat")
    await publish(state, embed, "p-embed", "embedding")
    await served(router, 2)
    url = router.url
    cases = [
        ("GET", "/nope", None, CLIENT_KEY, 404),
        ("GET", "/v1/nope", None, CLIENT_KEY, 404),
        ("PUT", "/v1/chat/completions", CHAT_BODY, CLIENT_KEY, 405),
        ("DELETE", "/v1/models", None, CLIENT_KEY, 405),
        ("PATCH", "/admin/models", {}, ADMIN_KEY, 405),
        ("GET", "/v1/models/not-loaded", None, CLIENT_KEY, 404),
    ]
    for method, path, body, key, expected in cases:
        status, headers, answer = http(method, url + path, body, key)
        assert status == expected, (method, path, status, answer[:200])
        assert headers["Content-Type"].startswith("application/json")
        openai_error(answer)
    # A 20 MB admin body, and one that is not UTF-8.
    status, _, answer = http("POST", url + "/admin/models", key=ADMIN_KEY, raw=b"x" * 20_000_000)
    assert status == 413 and openai_error(answer)["code"] == "body_too_large"
    status, _, answer = http("POST", url + "/admin/models", key=ADMIN_KEY, raw=b'{"model": "\xff"}')
    assert status == 400 and "UTF-8" in str(openai_error(answer)["message"])
    # The wrong task: refused by the router, before any engine is touched.
    status, _, answer = http("POST", url + "/v1/embeddings", {"model": CHAT, "input": "x"})
    assert status == 400 and openai_error(answer)["code"] == "wrong_model_task"
    assert "chat" in str(openai_error(answer)["message"])
    status, _, answer = http("POST", url + "/v1/chat/completions", {**CHAT_BODY, "model": EMBED})
    assert status == 400 and openai_error(answer)["code"] == "wrong_model_task"
    assert chat.served() == 0 and embed.served() == 0
    # The OpenAI SDK's models.retrieve.
    api = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)
    assert api.models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("not-loaded")


async def test_a_read_only_key_reads_and_cannot_write(router: RouterProcess) -> None:
    url = router.url + "/admin"
    for path in ("/sd", "/cluster", "/models", "/nodes", "/catalog"):
        status, _, answer = http("GET", url + path, key=READ_KEY)
        assert status == 200, (path, answer[:200])
    for method, path, body in [
        ("POST", "/models", {"model": CHAT}),
        ("DELETE", "/models/x", None),
        ("POST", "/keys", {"name": "mine"}),
        ("GET", "/keys", None),
        ("POST", "/nodes/n1/drain", None),
    ]:
        status, _, answer = http(method, url + path, body, key=READ_KEY)
        assert status == 401, (method, path, status)
        assert openai_error(answer)["code"] == "invalid_admin_key"
    assert http("GET", url + "/keys", key=ADMIN_KEY)[0] == 200
    assert http("GET", url + "/sd", key=CLIENT_KEY)[0] == 401


async def test_a_keys_rate_is_shared_by_every_router(
    state: State,
    redis_url: str,
    redis_server: RedisServer,
    tmp_path: Path,
    engines: Callable[..., EngineProcess],
) -> None:
    rate = 0.5  # a burst of one, then one every 2 s
    key = await state.api_keys.create("limited", rate)
    routers = [RouterProcess(redis_url, tmp_path, **router_env()) for _ in range(2)]
    try:
        engine = engines(CHAT)
        await publish(state, engine, "p-chat", "chat")
        for r in routers:
            await served(r, 1)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(
                pool.map(
                    lambda i: http(
                        "POST", routers[i % 2].url + "/v1/chat/completions", CHAT_BODY, key=key
                    ),
                    range(12),
                )
            )
        elapsed = time.monotonic() - started
        ok = sum(1 for status, _, _ in answers if status == 200)
        limited = [h for status, h, _ in answers if status == 429]
        assert ok + len(limited) == 12 and limited
        # One key, both routers: a burst of one, then `rate` per second, however slow
        # this machine. Each router on its own would let through one more at least
        # (a burst each): 2 + 2 * rate * elapsed.
        assert ok <= 1 + rate * elapsed + 0.05, f"{ok} answered in {elapsed:.2f}s at {rate}/s"
        assert all(int(h["Retry-After"]) >= 1 for h in limited)
        # Redis away: each router falls back to its own limit and keeps serving.
        redis_server.stop()
        await asyncio.sleep(1.1)
        status, _, _ = http("POST", routers[0].url + "/v1/chat/completions", CHAT_BODY, key=key)
        assert status == 200
    finally:
        for r in routers:
            r.stop()
        for r in routers:
            for secret in (*SECRETS, key):
                assert secret not in r.log.read_text()

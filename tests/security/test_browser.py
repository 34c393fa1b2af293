"""What a web page in the operator's browser can make an open router do (no keys, on
loopback, as `shell/run` starts it): nothing. Each test failed on the code before
(30e7774 and after): /admin took `text/plain`, and nothing looked at Host or Origin."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from harness.processes import EngineProcess, RouterProcess
from nebula import redis_keys
from nebula.store import State
from tests.security.conftest import CHAT, READ_KEY, publish, raw_http, router_env, status_of
from tests.security.test_router_edges import served

LOAD = b'{"model": "tiny_chat"}'


@pytest.fixture
async def open_router(redis_url: str, tmp_path: Path) -> AsyncIterator[RouterProcess]:
    proc = RouterProcess(redis_url, tmp_path, NEBULA_ENGINE_API_KEY="engine-7d2b9c11")
    yield proc
    proc.stop()


def send(
    router: RouterProcess, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, bytes]:
    lines = [f"{method} {path} HTTP/1.1", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    answer = raw_http(router.port, "\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    return status_of(answer), answer.partition(b"\r\n\r\n")[2]


async def test_a_text_plain_post_to_admin_is_refused(
    state: State, open_router: RouterProcess
) -> None:
    # What an HTML form (or fetch with mode no-cors) can send anywhere without asking.
    host = {"Host": f"127.0.0.1:{open_router.port}"}
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, body = send(
            open_router,
            "POST",
            "/admin/keys",
            {**host, "Content-Type": kind},
            b'{"name": "from-a-page"}',
        )
        assert status == 415, body
        assert json.loads(body)["error"]["code"] == "unsupported_media_type"
        status, _ = send(
            open_router, "POST", "/admin/nodes/node-a/drain", {**host, "Content-Type": kind}
        )
        assert status == 415
    assert await state.api_keys.all() == []
    assert await state.redis.smembers(redis_keys.CORDONED) == set()
    # The operator's own tools send JSON, and are served.
    status, body = send(
        open_router,
        "POST",
        "/admin/keys",
        {**host, "Content-Type": "application/json"},
        b'{"name": "mine"}',
    )
    assert status == 201, body


async def test_a_foreign_host_or_origin_is_refused_on_an_open_router(
    state: State, open_router: RouterProcess, engines: Callable[..., EngineProcess]
) -> None:
    await publish(state, engines(CHAT), "p-chat", "chat")
    await served(open_router, 1)
    port = open_router.port
    chat = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}).encode()
    json_type = {"Content-Type": "application/json"}
    refused = [
        # DNS rebinding: the page's own name, resolved to 127.0.0.1.
        ("GET", "/admin/cluster", {"Host": f"attacker.example:{port}"}, b""),
        ("POST", "/admin/models", {"Host": f"rebind.attacker.example:{port}", **json_type}, LOAD),
        ("POST", "/v1/chat/completions", {"Host": "attacker.example"}, chat),
        ("GET", "/v1/models", {"Host": "192.168.1.20"}, b""),
        # A page elsewhere, sending to 127.0.0.1 (with a preflight the router never grants).
        (
            "POST",
            "/admin/models",
            {"Host": f"127.0.0.1:{port}", "Origin": "https://attacker.example", **json_type},
            LOAD,
        ),
        ("POST", "/v1/chat/completions", {"Host": f"localhost:{port}", "Origin": "null"}, chat),
    ]
    for method, path, headers, body in refused:
        status, answer = send(open_router, method, path, headers, body)
        assert status == 403, (path, headers, answer)
        assert json.loads(answer)["error"]["code"] == "foreign_origin"
    assert await state.requests.all() == []
    allowed = [
        ("GET", "/admin/cluster", {"Host": f"127.0.0.1:{port}"}, b""),
        ("GET", "/admin/cluster", {"Host": f"localhost:{port}"}, b""),
        ("GET", "/admin/cluster", {"Host": f"[::1]:{port}"}, b""),
        (
            "POST",
            "/v1/chat/completions",
            {"Host": f"127.0.0.1:{port}", "Origin": f"http://localhost:{port}"},
            chat,
        ),
    ]
    for method, path, headers, body in allowed:
        status, answer = send(open_router, method, path, headers, body)
        assert status == 200, (path, headers, answer)


async def test_metrics_can_require_a_key(redis_url: str, tmp_path: Path) -> None:
    router = RouterProcess(redis_url, tmp_path, **router_env(NEBULA_METRICS_REQUIRE_KEY="true"))
    try:
        request = urllib.request.Request(router.url + "/metrics")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        refused.value.close()
        assert refused.value.code == 401
        request.add_header("Authorization", f"Bearer {READ_KEY}")
        with urllib.request.urlopen(request, timeout=10) as r:
            assert b"nebula_router_requests" in r.read()
    finally:
        router.stop()

"""The router over real HTTP: a real redis-server, test engines as upstreams,
the official `openai` client as the caller."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest

from harness.cluster import wait_for
from harness.endpoints import announce, known_by_every_worker
from harness.processes import EngineProcess, RedisServer, RouterProcess, http_bytes, stop
from nebula.catalog import load_catalog
from nebula.models import Endpoint
from nebula.store import State

CHAT = "smollm2_135m_chat"
EMBED = "minilm_l6_embedding"
CLIENT_KEY = "sk-test-client"
ADMIN_KEY = "admin-secret"
ENGINE_KEY = "engine-internal"


def http(
    method: str,
    url: str,
    body: object = None,
    key: str | None = CLIENT_KEY,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
    status, headers, answer = http_bytes(method, url, body, key, raw, timeout=10)
    return status, headers, json.loads(answer or b"{}")


async def publish(state: State, engine: EngineProcess, placement_id: str) -> None:
    await announce(
        state,
        Endpoint(
            placement_id=placement_id,
            request_id=f"req-{engine.model}",
            model=engine.model,
            node="test-node",
            url=engine.url,
        ),
    )


async def wait_served(router: RouterProcess, model: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, _, body = http("GET", router.url + "/health")
        if status == 200 and body.get("endpoints", 0) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"router never saw {count} endpoint(s) of {model}")


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[list[EngineProcess]]:
    started: list[EngineProcess] = []

    def make(model: str, *extra: str) -> EngineProcess:
        engine = EngineProcess(model, tmp_path, ENGINE_KEY, *extra)
        started.append(engine)
        return engine

    yield make  # type: ignore[misc]
    for engine in started:
        stop(engine.proc)


@pytest.fixture
async def router(redis_url: str, tmp_path: Path) -> AsyncIterator[RouterProcess]:
    proc = RouterProcess(
        redis_url,
        tmp_path,
        NEBULA_API_KEYS=CLIENT_KEY,
        NEBULA_ADMIN_KEY=ADMIN_KEY,
        NEBULA_ENGINE_API_KEY=ENGINE_KEY,
        NEBULA_LOG_LEVEL="DEBUG",
        # These tests are about balancing, retries and errors across replicas; prefix
        # routing (the default) has its own, in tests/test_prefix_routing.py.
        NEBULA_ROUTING_POLICY="least_outstanding",
    )
    yield proc
    assert proc.stop() == 0
    log = proc.log.read_text()
    for secret in (CLIENT_KEY, ADMIN_KEY, ENGINE_KEY):
        assert secret not in log, "a key reached the router's log"


def client(router: RouterProcess, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0, timeout=20)


async def test_openai_client_chat_completions_embeddings_models(
    state: State, router: RouterProcess, engines
) -> None:  # type: ignore[no-untyped-def]
    chat_engine, embed_engine = engines(CHAT), engines(EMBED)
    await publish(state, chat_engine, "p-chat")
    await publish(state, embed_engine, "p-embed")
    await wait_served(router, CHAT, 2)
    api = client(router)

    answer = api.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hello there"}]
    )
    assert answer.choices[0].message.content == "echo: hello there "
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 3

    text = api.completions.create(
        model=CHAT, prompt="one two three four five six seven", max_tokens=4
    )
    assert text.choices[0].text == "echo: one two three "
    assert text.choices[0].finish_reason == "length"

    vectors = api.embeddings.create(model=EMBED, input=["a", "b c"])
    assert [len(v.embedding) for v in vectors.data] == [384, 384]

    assert sorted(m.id for m in api.models.list().data) == [EMBED, CHAT]


async def test_streaming_is_passed_through_as_it_arrives(
    state: State, router: RouterProcess, engines
) -> None:  # type: ignore[no-untyped-def]
    engine = engines(CHAT, "--chunk-delay-ms", "100")
    await publish(state, engine, "p-chat")
    await wait_served(router, CHAT)
    stream = client(router).chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "a b c d e"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals, words, finish = [], [], None
    for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
            words.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(words) == "echo: a b c d e "
    assert finish == "stop"
    # Six words, sent 100 ms apart over half a second: the client saw them spread
    # over most of it, not in one buffered lump (a busy machine may bunch a few, so
    # the spread, not each gap, is what is asked).
    assert len(arrivals) == 6
    assert arrivals[-1] - arrivals[0] > 0.25, [b - a for a, b in itertools.pairwise(arrivals)]


async def test_error_classes_through_the_openai_client(
    state: State, router: RouterProcess, engines
) -> None:  # type: ignore[no-untyped-def]
    engine = engines(CHAT)
    await publish(state, engine, "p-chat")
    await wait_served(router, CHAT)
    messages = [{"role": "user", "content": "hi"}]

    with pytest.raises(openai.AuthenticationError):
        client(router, key="sk-wrong").chat.completions.create(model=CHAT, messages=messages)
    with pytest.raises(openai.AuthenticationError):  # the internal key is not a client key
        client(router, key=ENGINE_KEY).chat.completions.create(model=CHAT, messages=messages)
    with pytest.raises(openai.NotFoundError, match=f"served models: {CHAT}"):
        client(router).chat.completions.create(model="gpt-9", messages=messages)

    # A loaded model with no healthy replica: 503 with Retry-After.
    await state.requests.create(load_catalog().get_spec(EMBED), 1)

    async def known() -> bool:  # the router has read the new model (not 404 any more)
        try:
            client(router).embeddings.create(model=EMBED, input="x")
        except openai.NotFoundError:
            return False
        except openai.InternalServerError:
            return True
        return True

    await wait_for(known, 15, "the router to know the loaded model")
    with pytest.raises(openai.InternalServerError) as err:
        client(router).embeddings.create(model=EMBED, input="x")
    assert err.value.status_code == 503
    assert err.value.response.headers["Retry-After"] == "5"
    assert engine.served() == 0, "a refused request reached the engine"


async def test_bad_input_gets_its_status_and_never_reaches_an_engine(
    state: State, redis_url: str, tmp_path: Path, engines
) -> None:  # type: ignore[no-untyped-def]
    router = RouterProcess(
        redis_url, tmp_path, NEBULA_API_KEYS=CLIENT_KEY, NEBULA_BODY_LIMIT_BYTES="2048",
        NEBULA_ENGINE_API_KEY=ENGINE_KEY,
    )  # fmt: skip
    try:
        engine = engines(CHAT)
        await publish(state, engine, "p-chat")
        await wait_served(router, CHAT)
        url = router.url + "/v1/chat/completions"
        cases = [
            (http("POST", url, raw=b"{not json"), 400, "invalid_json"),
            (http("POST", url, {"messages": []}), 400, "missing_model"),
            (http("POST", url, [1, 2]), 400, "missing_model"),
            (http("POST", url, {"model": 7}), 400, "missing_model"),
            (http("POST", url, {"model": CHAT}, key=None), 401, "invalid_api_key"),
            (http("POST", url, {"model": CHAT, "x": "y" * 4096}), 413, "body_too_large"),
            (http("POST", url, {"model": "http://169.254.169.254/latest"}), 404, "model_not_found"),
        ]
        for (status, _, body), want_status, want_code in cases:
            assert status == want_status, body
            assert body["error"]["code"] == want_code
            assert set(body["error"]) == {"message", "type", "code"}
        assert engine.served() == 0
        # And a good request still works after all that.
        status, _, body = http(
            "POST", url, {"model": CHAT, "messages": [{"role": "user", "content": "ok"}]}
        )
        assert status == 200 and engine.served() == 1
    finally:
        router.stop()


async def test_rate_limit_per_key(state: State, redis_url: str, tmp_path: Path, engines) -> None:  # type: ignore[no-untyped-def]
    router = RouterProcess(
        redis_url, tmp_path, NEBULA_ADMIN_KEY=ADMIN_KEY, NEBULA_ENGINE_API_KEY=ENGINE_KEY
    )
    try:
        status, _, created = http(
            "POST", router.url + "/admin/keys", {"name": "slow", "rate_per_s": 1}, key=ADMIN_KEY
        )
        assert status == 201 and created["key"].startswith("sk-nebula-")
        engine = engines(CHAT)
        await publish(state, engine, "p-chat")
        await wait_served(router, CHAT)
        api = client(router, key=created["key"])
        messages = [{"role": "user", "content": "hi"}]
        api.chat.completions.create(model=CHAT, messages=messages)
        with pytest.raises(openai.RateLimitError) as err:
            api.chat.completions.create(model=CHAT, messages=messages)
        assert int(err.value.response.headers["Retry-After"]) >= 1
        # Stored keys switch auth on: no key is now refused.
        assert (
            http("POST", router.url + "/v1/chat/completions", {"model": CHAT}, key=None)[0] == 401
        )
        assert engine.served() == 1
    finally:
        router.stop()


async def test_connect_errors_and_5xx_are_retried_on_another_replica(
    state: State, router: RouterProcess, engines
) -> None:  # type: ignore[no-untyped-def]
    good, failing, dead = engines(CHAT), engines(CHAT), engines(CHAT)
    failing.behave(fail_status=500)
    for i, engine in enumerate((good, failing, dead)):
        await publish(state, engine, f"p-{i}")
    dead.kill()
    await wait_served(router, CHAT, 3)
    api = client(router)
    for _ in range(20):
        answer = api.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "x"}]
        )
        assert answer.choices[0].message.content == "echo: x "
    assert good.served() == 20
    _status, _, _ = http("GET", router.url + "/health")
    metrics = urllib.request.urlopen(router.url + "/metrics").read().decode()
    assert f'nebula_router_retries_total{{model="{CHAT}"}}' in metrics
    assert 'kind="connect"' in metrics and 'kind="status_5xx"' in metrics


async def test_a_replica_killed_mid_run_fails_no_unstreamed_request(
    state: State, router: RouterProcess, engines
) -> None:  # type: ignore[no-untyped-def]
    a, b = engines(CHAT, "--tokens", "8"), engines(CHAT)
    a.behave(delay_ms=20)  # requests in flight on `a` when it dies
    b.behave(delay_ms=20)
    await publish(state, a, "p-a")
    await publish(state, b, "p-b")
    await wait_served(router, CHAT, 2)
    api = client(router)

    def one(i: int) -> str:
        answer = api.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": f"n{i}"}]
        )
        return answer.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(200)]
        deadline = time.monotonic() + 30
        while a.served() < 5 and time.monotonic() < deadline:  # `a` is busy now
            time.sleep(0.02)
        a.kill()
        answers = [f.result() for f in futures]  # any failure raises here
    assert answers == [f"echo: n{i} " for i in range(200)]


async def test_a_stream_that_breaks_ends_with_an_error_not_a_fake_stop(
    state: State, router: RouterProcess, engines
) -> None:  # type: ignore[no-untyped-def]
    engine = engines(CHAT, "--chunk-delay-ms", "20")
    engine.behave(die_after_chunks=2)
    await publish(state, engine, "p-chat")
    await wait_served(router, CHAT)
    stream = client(router).chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "a b c d"}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError, match="stream broke off"):
        for chunk in stream:
            seen.append(chunk)
    assert all(c.choices[0].finish_reason is None for c in seen if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in seen) == "echo: a "


async def test_requests_keep_succeeding_while_redis_is_down(
    redis_server: RedisServer, state: State, router: RouterProcess, engines
) -> None:  # type: ignore[no-untyped-def]
    engine = engines(CHAT)
    await publish(state, engine, "p-chat")
    await wait_served(router, CHAT)
    api = client(router)
    redis_server.stop()
    try:
        for _ in range(30):
            answer = api.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "up"}]
            )
            assert answer.choices[0].message.content == "echo: up "
            time.sleep(0.02)  # across several refresh periods of the table
        _, _, health = http("GET", router.url + "/health")
        assert health["status"].startswith("degraded")
    finally:
        redis_server.start()


async def test_admin_api(state: State, router: RouterProcess) -> None:
    admin = router.url + "/admin"
    assert http("GET", admin + "/models", key=CLIENT_KEY)[0] == 401
    assert http("GET", admin + "/models", key=None)[0] == 401

    status, _, created = http(
        "POST", admin + "/models", {"model": CHAT, "replicas": 2}, key=ADMIN_KEY
    )
    assert status == 201 and created["status"] == "Pending" and created["replicas"] == 2
    cases = [
        ({"model": CHAT}, 409),
        ({"model": "nope"}, 404),
        ({"model": EMBED, "replicas": 0}, 400),
        ({"model": EMBED, "gpu_memory_utilization": 1.5}, 400),
        ({"model": EMBED, "colour": "red"}, 400),
        ({}, 400),
    ]
    for body, want in cases:
        status, _, err = http("POST", admin + "/models", body, key=ADMIN_KEY)
        assert status == want, (body, err)
        assert err["error"]["message"]
    status, _, _raw = http("POST", admin + "/models", raw=b"[", key=ADMIN_KEY)
    assert status == 400

    status, _, listed = http("GET", admin + "/models", key=ADMIN_KEY)
    assert [m["model"] for m in listed["models"]] == [CHAT]
    status, _, shown = http("GET", admin + f"/models/{CHAT}", key=ADMIN_KEY)
    assert status == 200 and shown["id"] == created["id"] and shown["events"][0]["message"]
    assert http("GET", admin + "/models/nope", key=ADMIN_KEY)[0] == 404
    status, _, unloading = http("DELETE", admin + f"/models/{created['id']}", key=ADMIN_KEY)
    assert status == 202 and unloading["status"] == "Unloading"

    status, _, catalog = http("GET", admin + "/catalog", key=ADMIN_KEY)
    assert CHAT in [m["name"] for m in catalog["models"]]
    assert http("POST", admin + "/nodes/ghost/cordon", key=ADMIN_KEY)[0] == 404
    status, _, cluster = http("GET", admin + "/cluster", key=ADMIN_KEY)
    assert status == 200 and set(cluster) >= {"nodes", "endpoints", "models", "placements"}

    status, _, key = http("POST", admin + "/keys", {"name": "team-a"}, key=ADMIN_KEY)
    assert status == 201
    assert http("POST", admin + "/keys", {"name": "team-a"}, key=ADMIN_KEY)[0] == 409
    status, _, keys = http("GET", admin + "/keys", key=ADMIN_KEY)
    assert [k["name"] for k in keys["keys"]] == ["team-a"] and key["key"] not in json.dumps(keys)
    assert http("DELETE", admin + "/keys/team-a", key=ADMIN_KEY)[0] == 200
    assert http("DELETE", admin + "/keys/team-a", key=ADMIN_KEY)[0] == 404


def test_refuses_an_open_router_beyond_loopback(redis_url: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "nebula.daemons", "router", "--host", "0.0.0.0"],
        env={"NEBULA_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "NEBULA_TRUSTED_NETWORK" in result.stderr and "Traceback" not in result.stderr


async def test_two_workers_share_the_port_and_sum_their_metrics(
    state: State, redis_url: str, tmp_path: Path, engines
) -> None:  # type: ignore[no-untyped-def]
    router = RouterProcess(redis_url, tmp_path, workers=2, NEBULA_ENGINE_API_KEY=ENGINE_KEY)
    try:
        engine = engines(CHAT)
        await publish(state, engine, "p-chat")
        await known_by_every_worker(router.url, endpoints=1)
        api = client(router)
        for _ in range(40):
            api.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "w"}])
        metrics = urllib.request.urlopen(router.url + "/metrics").read().decode()
        line = next(
            line for line in metrics.splitlines()
            if line.startswith("nebula_router_requests_total") and 'status="200"' in line
        )  # fmt: skip
        assert float(line.split()[-1]) == 40.0
    finally:
        assert router.stop() == 0


async def test_an_engine_refusing_the_internal_key_is_not_the_clients_fault(
    state: State, redis_url: str, tmp_path: Path, engines
) -> None:  # type: ignore[no-untyped-def]
    router = RouterProcess(redis_url, tmp_path, NEBULA_ENGINE_API_KEY="stale-key")
    try:
        await publish(state, engines(CHAT), "p-chat")
        await wait_served(router, CHAT)
        with pytest.raises(openai.APIStatusError, match="refused the router's engine key") as err:
            client(router).chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "x"}]
            )
        assert err.value.status_code == 502
    finally:
        router.stop()
    assert "check NEBULA_ENGINE_API_KEY" in router.log.read_text()

"""The node agent with a real supervisord, real scheduler and real Redis, and the
project's test engine (real vLLM is in tests/test_e2e_vllm.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from harness.cluster import ENGINE_KEY, Cluster, wait_for
from nebula.models import Phase, Status
from nebula.store import State


@pytest.fixture
async def cluster(redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(redis_url, tmp_path)
    yield c
    c.close()


def chat(url: str, text: str, key: str = ENGINE_KEY, stream: bool = False) -> bytes:
    body = {"model": "tiny_chat", "messages": [{"role": "user", "content": text}], "stream": stream}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def endpoints(state: State) -> list:  # type: ignore[type-arg]
    return await state.endpoints.all()


async def engine_pid(state: State, node: str = "node-a") -> int:
    async def check() -> int | None:
        states = await state.placements.states(node)
        pids = [s.pid for s in states.values() if s.phase is Phase.HEALTHY and s.pid]
        return pids[0] if pids else None

    return await wait_for(check, 20, "a healthy engine with a pid")


async def test_load_ready_unload_gone(state: State, cluster: Cluster) -> None:
    started = time.monotonic()
    request = await cluster.load(state, "tiny_chat")
    await cluster.status(state, request.id, Status.READY)
    load_to_ready = time.monotonic() - started
    [endpoint] = await endpoints(state)
    assert endpoint.model == "tiny_chat" and endpoint.node == "node-a"
    answer = json.loads(chat(endpoint.url, "hello node"))
    assert answer["choices"][0]["message"]["content"] == "echo: hello node "
    with pytest.raises(urllib.error.HTTPError) as err:  # the engine wants the internal key
        chat(endpoint.url, "x", key="wrong")
    assert err.value.code == 401
    err.value.close()
    pid = await engine_pid(state)
    assert [p.name for p in cluster.paths.programs.glob("*.conf")]

    started = time.monotonic()
    await state.requests.unload(request.id)
    await cluster.gone(state, request.id)
    unload_to_gone = time.monotonic() - started
    assert not alive(pid)
    assert await endpoints(state) == []
    assert not list(cluster.paths.programs.glob("*.conf"))
    print(
        f"\ntest engine: load -> Ready {load_to_ready:.2f}s, unload -> gone {unload_to_gone:.2f}s"
    )


async def test_killed_engine_is_withdrawn_restarted_and_back(
    state: State, cluster: Cluster
) -> None:
    request = await cluster.load(state, "tiny_chat")
    await cluster.status(state, request.id, Status.READY)
    pid = await engine_pid(state)
    os.kill(pid, signal.SIGKILL)

    async def withdrawn() -> bool:
        return await endpoints(state) == []

    # Withdrawn on the first failed probe (0.3 s here), before supervisord's restart
    # brings the engine back: an agent that does not withdraw never gets there.
    await wait_for(withdrawn, 10, "the endpoint to be withdrawn")

    async def back() -> int | None:
        eps = await endpoints(state)
        new_pid = await engine_pid(state)
        return new_pid if eps and new_pid != pid else None

    new_pid = await wait_for(back, 20, "the engine restarted and its endpoint back")
    assert new_pid != pid
    assert (await state.placements.states("node-a")).popitem()[1].restarts == 1
    await cluster.status(state, request.id, Status.READY)


async def test_engine_that_cannot_start_fails_with_its_log(state: State, cluster: Cluster) -> None:
    request = await cluster.load(state, "broken_chat")
    # One replacement (NEBULA_MAX_REPLACEMENTS=1) fails too: then no replica can run.
    failed = await cluster.status(state, request.id, Status.FAILED, timeout=60)
    assert "OSError: boom, weights not found" in failed.message
    # supervisord gives up (FATAL: "could not start"), or the agent first counts the
    # restarts past max_restarts ("crashed N times"): either way, bounded and with the log.
    assert re.match(
        r"no replica can run: 2 failed; last: (could not start|crashed \d times)", failed.message
    ), failed.message
    logs = sorted(cluster.paths.logs.glob("engine-*.log"))
    assert len(logs) == 2, logs  # the first replica and its one replacement
    starts = [log.read_text().count("test engine for broken_chat starting") for log in logs]
    assert all(1 <= n <= 1 + 2 for n in starts), f"started {starts} times with max_restarts=2"
    await asyncio.sleep(1.5)  # and no more tries after Failed
    after = [log.read_text().count("test engine for broken_chat starting") for log in logs]
    assert after == starts and len(list(cluster.paths.logs.glob("engine-*.log"))) == 2
    await state.requests.unload(request.id)
    await cluster.gone(state, request.id)


async def test_agent_restart_adopts_running_engines(state: State, cluster: Cluster) -> None:
    request = await cluster.load(state, "tiny_chat")
    await cluster.status(state, request.id, Status.READY)
    pid = await engine_pid(state)
    agent = await wait_for(lambda: asyncio.to_thread(_agent_pid, cluster), 10, "the agent")
    os.kill(agent, signal.SIGKILL)

    async def new_agent() -> int | None:
        current = _agent_pid(cluster)
        return current if current and current != agent else None

    await wait_for(new_agent, 15, "supervisord to restart the agent")
    await asyncio.sleep(2.0)  # several convergence passes of the new agent
    assert await engine_pid(state) == pid and alive(pid)
    assert (await state.requests.get(request.id)).status is Status.READY


def _agent_pid(cluster: Cluster) -> int | None:
    from nebula.agent.supervisor import Supervisor

    sup = Supervisor(cluster.paths.socket, cluster.paths.programs, cluster.paths.logs)
    info = sup._call("supervisor.getProcessInfo", "nebula-agent")
    return int(info["pid"]) or None


async def test_unload_drains_a_request_in_flight(state: State, cluster: Cluster) -> None:
    request = await cluster.load(state, "slow_chat")
    await cluster.status(state, request.id, Status.READY)
    [endpoint] = await endpoints(state)
    pid = await engine_pid(state)

    def slow_stream() -> bytes:
        words = "one two three four five six"
        body = {"model": "slow_chat", "stream": True,
                "messages": [{"role": "user", "content": words}]}  # fmt: skip
        req = urllib.request.Request(
            endpoint.url + "/v1/chat/completions", data=json.dumps(body).encode()
        )
        req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", f"Bearer {ENGINE_KEY}")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    in_flight = asyncio.create_task(asyncio.to_thread(slow_stream))
    await asyncio.sleep(0.5)  # the answer is streaming: 7 words, 300 ms apart
    await state.requests.unload(request.id)
    answer = await in_flight
    assert answer.rstrip().endswith(b"data: [DONE]"), answer[-200:]
    assert b'"finish_reason": "stop"' in answer
    await cluster.gone(state, request.id)
    assert not alive(pid)

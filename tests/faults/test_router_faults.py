"""The router under faults: a hung engine, a read-only Redis, a dead worker, life as
PID 1, and streams in flight through an unload."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from harness.cluster import wait_for
from harness.endpoints import announce
from harness.processes import EngineProcess, RouterProcess, free_port, stop, wait_for_port
from nebula.models import Endpoint, Status
from nebula.store import State
from tests.faults.conftest import CLIENT_KEY, Node, steady_load

ENGINE_KEY = "engine-faults"
CHAT = {"model": "tiny_chat", "messages": [{"role": "user", "content": "hi"}]}


async def post(url: str, body: object, key: str = CLIENT_KEY) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        headers = {"Authorization": f"Bearer {key}"}
        async with session.post(url, json=body, headers=headers) as r:
            return r.status, await r.text()


async def test_a_hung_engine_is_a_504_within_the_timeout_and_is_never_sent_twice(
    state: State, redis_url: str, tmp_path: Path
) -> None:
    engines = [EngineProcess("tiny_chat", tmp_path, ENGINE_KEY) for _ in range(2)]
    router = RouterProcess(
        redis_url,
        tmp_path,
        NEBULA_ENGINE_API_KEY=ENGINE_KEY,
        NEBULA_FIRST_BYTE_TIMEOUT_S="1",
    )
    try:
        for i, engine in enumerate(engines):
            engine.behave(delay_ms=5000)  # takes the request, answers nothing in time
            endpoint = Endpoint(f"p{i}", "r", "tiny_chat", "n", engine.url, "chat")
            await announce(state, endpoint)

        async def both_routed() -> bool:
            async with aiohttp.ClientSession() as s, s.get(router.url + "/health") as r:
                return (await r.json())["endpoints"] == 2

        await wait_for(both_routed, 10, "both endpoints routed")
        started = time.monotonic()
        status, text = await post(router.url + "/v1/chat/completions", CHAT, key="")
        took = time.monotonic() - started
        assert status == 504 and json.loads(text)["error"]["code"] == "upstream_timeout"
        assert took < 4, f"504 after {took:.1f}s with a 1 s timeout"
        assert sum(e.served() for e in engines) == 1, "the request was sent again"
    finally:
        router.stop()
        for engine in engines:
            stop(engine.proc)


@pytest.mark.timeout(120)
async def test_a_read_only_redis_leaves_every_daemon_alive_and_the_router_serving(
    node: Node,
) -> None:
    request_id = await node.ready(replicas=2)
    pids = await node.engine_pids()
    async with steady_load(node.router.url) as load:
        await asyncio.sleep(1)
        # As after a Sentinel failover: the old master is now a replica (of a master
        # that is not there), and every write is refused with READONLY.
        node.redis.command("REPLICAOF", "127.0.0.1", str(free_port()))
        await asyncio.sleep(3 * 4.0)
        async with aiohttp.ClientSession() as s, s.get(node.router.url + "/health") as r:
            health = await r.json()
        assert health["status"].startswith("degraded"), health
        for name, proc in [("scheduler", node.cluster.scheduler), ("node", node.cluster.node),
                           ("router", node.router.proc)]:  # fmt: skip
            assert proc.poll() is None, f"the {name} died"
        node.redis.command("REPLICAOF", "NO", "ONE")
        await asyncio.sleep(2 * 4.0)
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:5]}"
    assert load.total > 50
    assert await node.engine_pids() == pids
    assert (await node.state.requests.get(request_id)).status is Status.READY
    log = node.cluster.agent_log()
    assert "READONLY" in log or "read-only" in log.lower() or "refused" in log


def children(pid: int) -> set[int]:
    """The router's worker processes (not multiprocessing's resource tracker)."""
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return {int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line}


async def healthy(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def test_a_dead_router_worker_is_replaced(redis_url: str, tmp_path: Path) -> None:
    router = RouterProcess(redis_url, tmp_path, workers=2)
    try:

        async def two_workers() -> bool:
            return len(children(router.proc.pid)) >= 2

        await wait_for(two_workers, 20, "2 workers")
        workers = children(router.proc.pid)
        victim = min(workers)
        subprocess.run(["kill", "-9", str(victim)], check=True)

        async def replaced() -> bool:
            now = children(router.proc.pid)
            return len(now) >= 2 and victim not in now

        await wait_for(replaced, 20, "a new worker in place of the dead one")
        assert await healthy(router.url)
        assert router.proc.poll() is None
        assert "died" in router.log.read_text()
    finally:
        router.stop()


async def test_router_workers_live_under_a_parent_that_is_pid_1(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "router-pid1.log"
    env = {"NEBULA_REDIS_URL": redis_url, "NEBULA_ROUTER_PORT": str(port)}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child",
             sys.executable, "-m", "nebula.daemons", "router", "--workers", "2"],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(port, timeout=30)
        url = f"http://127.0.0.1:{port}"
        for _ in range(10):  # workers that exited at once would take the router down
            assert await healthy(url), log.read_text()
            await asyncio.sleep(0.3)
        assert proc.poll() is None, log.read_text()
        assert "died" not in log.read_text()
    finally:
        stop(proc)


async def stream(url: str, model: str, words: int = 7) -> str:
    prompt = " ".join(f"w{i}" for i in range(words))
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url + "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 200
        return await r.text()


async def unload(node: Node, ref: str, drain: float | None = None) -> None:
    query = "" if drain is None else f"?drain_timeout_s={drain:g}"
    async with (
        aiohttp.ClientSession() as s,
        s.delete(node.router.url + f"/admin/models/{ref}{query}") as r,
    ):
        assert r.status == 202, await r.text()


@pytest.mark.timeout(120)
async def test_unload_waits_for_streams_and_a_cut_stream_says_it_was_unloaded(
    node: Node,
) -> None:
    # slow_chat streams 8 chunks 300 ms apart: 2.4 s per answer.
    request_id = await node.ready("slow_chat", replicas=1)
    streams = [asyncio.create_task(stream(node.router.url, "slow_chat")) for _ in range(3)]
    await asyncio.sleep(0.5)
    await unload(node, request_id)  # the default drain: the answers finish
    answers = await asyncio.gather(*streams)
    assert all(a.rstrip().endswith("data: [DONE]") for a in answers), answers
    status, text = await post(node.router.url + "/v1/chat/completions",
                              {**CHAT, "model": "slow_chat"})  # fmt: skip
    assert status in (503, 404), text
    if status == 503:
        assert json.loads(text)["error"]["code"] == "model_unloading"
    await node.cluster.gone(node.state, request_id)

    # Again, with a drain shorter than the answer (long_chat: 40 chunks 200 ms apart,
    # 8 s): the stream is cut, and says why.
    request_id = await node.ready("long_chat", replicas=1)
    cut = asyncio.create_task(stream(node.router.url, "long_chat", words=40))
    await asyncio.sleep(0.5)
    await unload(node, request_id, drain=0.3)
    answer = await cut
    assert "data: [DONE]" not in answer
    last = json.loads(answer.strip().split("data: ")[-1])
    assert last["error"]["code"] == "model_unloaded", last
    await node.cluster.gone(node.state, request_id)


async def _read_stream(url: str, done: list[str]) -> str:
    words = " ".join(f"w{i}" for i in range(20))
    body = {"model": "tiny_chat", "stream": True,
            "messages": [{"role": "user", "content": words}]}  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=60)
    text = ""
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url + "/v1/chat/completions", json=body) as r,
        ):
            assert r.status == 200
            async for chunk in r.content.iter_any():
                text += chunk.decode()
    except aiohttp.ClientError as exc:  # the connection cut under the stream
        text += f"\n(cut: {type(exc).__name__})"
    done.append(text)
    return text


@pytest.mark.timeout(120)
async def test_a_router_stopped_mid_stream_finishes_its_answers_within_its_drain(
    state: State, redis_url: str, tmp_path: Path
) -> None:
    # Streams of 20 chunks 150 ms apart (3 s) in flight when the router gets SIGTERM:
    # with a 20 s drain every answer ends with [DONE]; with a 0.5 s drain the router
    # stops at once anyway, and each cut stream ends with an error event saying so.
    # Either way it exits 0, in its own time.
    engine = EngineProcess("tiny_chat", tmp_path, ENGINE_KEY,
                           "--chunk-delay-ms", "150", "--tokens", "20")  # fmt: skip
    try:
        await announce(state, Endpoint("p0", "r", "tiny_chat", "n", engine.url, "chat"))
        for drain, finished in ((20.0, True), (0.5, False)):
            router = RouterProcess(
                redis_url, tmp_path, NEBULA_ENGINE_API_KEY=ENGINE_KEY,
                NEBULA_ROUTER_DRAIN_S=str(drain),
            )  # fmt: skip

            async def routed(router: RouterProcess = router) -> bool:
                async with aiohttp.ClientSession() as s, s.get(router.url + "/health") as r:
                    return (await r.json())["endpoints"] == 1

            await wait_for(routed, 20, "the endpoint routed")
            done: list[str] = []
            before = engine.served()
            streams = [asyncio.create_task(_read_stream(router.url, done)) for _ in range(4)]

            async def in_flight(before: int = before, done: list[str] = done) -> bool:
                return engine.served() - before == 4 and not done

            await wait_for(in_flight, 20, "4 streams in flight")
            started = time.monotonic()
            code = await asyncio.to_thread(router.stop)
            stopped_s = time.monotonic() - started
            answers = await asyncio.gather(*streams)
            assert code == 0, f"router exit {code} (drain {drain} s)"
            complete = [a.rstrip().endswith("data: [DONE]") for a in answers]
            if finished:
                assert all(complete), answers
                assert stopped_s >= 1.0, f"stopped in {stopped_s:.1f}s under 3 s streams"
            else:
                assert not any(complete), answers
                assert stopped_s < 10, f"stopped in {stopped_s:.1f}s with a 0.5 s drain"
                # Cut, and told so: the last event names the router's stop.
                for answer in answers:
                    last = json.loads(answer.strip().split("data: ")[-1])
                    assert last["error"]["code"] == "router_stopped", answer
    finally:
        stop(engine.proc)


def counter(router: RouterProcess, name: str, **labels: str) -> float:
    """A counter's value from the router's /metrics (0 when it has no such series)."""
    import urllib.request

    text = urllib.request.urlopen(router.url + "/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.timeout(120)
async def test_a_replica_that_died_unannounced_is_left_out_after_a_refused_connect(
    state: State, redis_url: str, tmp_path: Path
) -> None:
    # An engine killed with nothing to withdraw its endpoint (its supervisord died
    # too, say): until the endpoint goes, every request sent there pays a failed
    # connect before its retry. The router leaves it out after the first, for 0.5 s,
    # then 1 s, 2 s, ... while it keeps refusing: a few connects, not one request in two.
    engines = [EngineProcess("tiny_chat", tmp_path, ENGINE_KEY) for _ in range(2)]
    router = RouterProcess(
        redis_url, tmp_path, NEBULA_ENGINE_API_KEY=ENGINE_KEY, NEBULA_API_KEYS=CLIENT_KEY,
        NEBULA_ROUTING_POLICY="least_outstanding",
    )  # fmt: skip
    replacement = None
    try:
        for i, engine in enumerate(engines):
            await announce(state, Endpoint(f"p{i}", "r", "tiny_chat", "n", engine.url, "chat"))

        async def routed() -> bool:
            async with aiohttp.ClientSession() as s, s.get(router.url + "/health") as r:
                return (await r.json())["endpoints"] == 2

        await wait_for(routed, 20, "both endpoints routed")
        engines[0].kill()
        async with steady_load(router.url, workers=4, pause_s=0.01) as load:
            await asyncio.sleep(4)
        assert not load.failures, load.failures[:5]
        assert load.total >= 40, load.results
        connects = counter(router, "nebula_router_upstream_errors_total", kind="connect")
        assert 1 <= connects <= 16, f"{connects} failed connects in {load.total} requests"
        assert counter(router, "nebula_router_ejections_total", model="tiny_chat") == connects

        # The placement comes back at another address: no ejection carries over.
        replacement = EngineProcess("tiny_chat", tmp_path, ENGINE_KEY)
        await announce(state, Endpoint("p0", "r", "tiny_chat", "n", replacement.url, "chat"))

        async def replacement_serves() -> bool:
            await post(router.url + "/v1/chat/completions", CHAT)
            return replacement.served() > 0  # type: ignore[union-attr]

        await wait_for(replacement_serves, 20, "the replacement to get requests")
    finally:
        for proc in [*(e.proc for e in engines), *([replacement.proc] if replacement else [])]:
            stop(proc)
        router.stop()

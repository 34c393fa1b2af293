"""Admin input against a whole node (real scheduler, supervisord, agent, router):
generated load requests never add a program to supervisord or a file anywhere
(the API's allowlist refuses most of them first; the same injections written
straight into Redis, where only the agent's own check stands, are in
test_redis_trust.py);
engines are closed by default; no key is written to any log or config or shown
in `ps`; a Redis URL's password is never echoed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.cluster import Cluster
from harness.processes import RouterProcess, http_bytes
from nebula.agent.supervisor import Supervisor
from nebula.models import Status
from nebula.store import State
from tests.security.conftest import ADMIN_KEY, CLIENT_KEY, READ_KEY, raw_http, router_env

MARKER = Path("/tmp/nebula-security-pwned")
INJECTIONS = [
    f"\n[program:evil]\ncommand=/usr/bin/touch {MARKER}\nautostart=true\nignored=",
    f"--max-model-len\n[program:evil2]\ncommand=/usr/bin/touch {MARKER}",
    f"\r\n[include]\nfiles={MARKER}*",
    "--api_key=stolen",
    "--served_model_name=x",
    "--model=/etc",
    "--trust-remote-code",
    "%(ENV_HOME)s",
    "a ;b",
]
SAFE = ["--max-model-len", "256", "--enforce-eager", "--dtype", "auto", "--seed", "7"]


def post(url: str, body: object, key: str = ADMIN_KEY, method: str = "POST") -> tuple[int, bytes]:
    status, _, answer = http_bytes(method, url, body, key)
    return status, answer


def supervisor_programs(cluster: Cluster) -> set[str]:
    paths = cluster.paths
    supervisor = Supervisor(paths.socket, paths.programs, paths.logs)
    return {info["name"] for info in supervisor._call("supervisor.getAllProcessInfo")}


def own_programs_only(cluster: Cluster) -> None:
    names = supervisor_programs(cluster)
    assert all(n == "nebula-agent" or n.startswith("engine-") for n in names), names
    for path in cluster.paths.programs.glob("*"):
        assert path.name.startswith("engine-") and path.suffix == ".conf", path
        sections = [line for line in path.read_text().splitlines() if line.startswith("[")]
        assert sections == [f"[program:{path.stem}]"], (path, sections)
    assert not list(MARKER.parent.glob(MARKER.name + "*")), "an injected program ran"


@pytest.fixture
def node(redis_url: str, tmp_path: Path) -> Iterator[tuple[Cluster, RouterProcess]]:
    for leftover in MARKER.parent.glob(MARKER.name + "*"):
        leftover.unlink()
    cluster = Cluster(redis_url, tmp_path)
    router = cluster.start_router(**router_env())
    deadline = time.monotonic() + 30
    while not cluster.paths.socket.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield cluster, router
    finally:
        cluster.close()


json_values = st.none() | st.booleans() | st.integers(-5, 300) | st.floats() | st.text(max_size=20)
args = st.lists(st.sampled_from(INJECTIONS + SAFE) | st.text(max_size=30), max_size=6)


@pytest.mark.timeout(300)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    model=st.sampled_from(["tiny_chat", "slow_chat"]) | st.text(max_size=30),
    replicas=st.just(1) | json_values,
    engine_args=args,
    memory=json_values,
    extra=st.dictionaries(st.text(max_size=12), json_values, max_size=2),
)
@example(model="tiny_chat", replicas=1, engine_args=[INJECTIONS[0]], memory=None, extra={})
@example(model="tiny_chat", replicas=1, engine_args=INJECTIONS[:3], memory=None, extra={})
@example(model="tiny_chat", replicas=1, engine_args=["--max_model_len=64"], memory=1, extra={})
def test_generated_load_requests_add_no_program_and_no_file(
    node: tuple[Cluster, RouterProcess],
    model: str,
    replicas: object,
    engine_args: list[str],
    memory: object,
    extra: dict[str, object],
) -> None:
    cluster, router = node
    body = {**extra, "model": model, "replicas": replicas, "engine_args": engine_args}
    if memory is not None:
        body["cpu_memory_gib"] = memory
    status, answer = post(router.url + "/admin/models", body)
    assert status in (201, 400, 404, 409), (status, answer)
    error = json.loads(answer).get("error")
    assert (status == 201) == (error is None)
    if status == 201:
        created = json.loads(answer)
        # Let the node act on it (write the program, start it) before taking it away.
        time.sleep(1.0)
        own_programs_only(cluster)
        assert post(router.url + f"/admin/models/{created['id']}", None, method="DELETE")[0] == 202
    own_programs_only(cluster)


async def test_engines_are_closed_by_default_and_no_key_is_written_or_shown(
    redis_url: str, state: State, tmp_path: Path
) -> None:
    # No engine key configured: the node makes one; a router in the same state_dir uses it.
    cluster = Cluster(redis_url, tmp_path, extra_env={"NEBULA_ENGINE_API_KEY": ""})
    try:
        router = cluster.start_router(**{**router_env(), "NEBULA_ENGINE_API_KEY": ""})
        request = await cluster.load(state, "tiny_chat")
        await cluster.status(state, request.id, Status.READY, 60)
        key_file = cluster.settings.state_dir / "engine.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        engine_key = key_file.read_text().strip()
        [endpoint] = await state.endpoints.all()
        body = {"model": "tiny_chat", "messages": [{"role": "user", "content": "hi"}]}
        status, _ = post(endpoint.url + "/v1/chat/completions", body, key="")
        assert status == 401, "an engine answered without the internal key"
        status, answer = post(router.url + "/v1/chat/completions", body, key=CLIENT_KEY)
        assert status == 200, answer
        # Traffic that tries to put keys in logs: malformed headers, wrong keys, admin calls.
        for secret in (CLIENT_KEY, ADMIN_KEY, READ_KEY, engine_key):
            raw_http(router.port, b"GET /v1/models HTTP/1.1\r\nAuthorization : Bearer "
                     + secret.encode() + b"\r\n\r\n")  # fmt: skip
            post(router.url + "/v1/chat/completions", body, key=secret + "x")
        post(router.url + "/admin/cluster", None, key=READ_KEY, method="GET")
        ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        written = [p for p in tmp_path.rglob("*") if p.is_file() and p != key_file]
        assert any(p.name == "agent.log" for p in written)
        assert any(p.parent == cluster.paths.programs for p in written)
        for secret in (CLIENT_KEY, ADMIN_KEY, READ_KEY, engine_key):
            assert secret not in ps, "a key is visible in ps"
            for path in written:
                if path.suffix in (".sock",):
                    continue
                assert secret not in path.read_text(errors="replace"), f"a key in {path}"
        # What the node writes is not for other users of the machine.
        for folder in (cluster.paths.logs, cluster.paths.programs):
            for path in folder.iterdir():
                mode = stat.S_IMODE(path.stat().st_mode)
                assert mode & 0o007 == 0, f"{path} is {oct(mode)}"
    finally:
        cluster.close()


def test_a_node_beyond_loopback_without_an_engine_key_refuses_to_start(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "NEBULA_NODE_ADDRESS": "10.255.255.1",
        "NEBULA_ENGINE_API_KEY": "",
        "NEBULA_STATE_DIR": str(tmp_path / "state"),
        "NEBULA_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nebula.daemons", "node"],
            env=env, capture_output=True, text=True, timeout=40,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the node did not refuse to start")
    assert done.returncode == 2
    assert "NEBULA_ENGINE_API_KEY" in done.stderr and "10.255.255.1" in done.stderr
    assert not (tmp_path / "state" / "engine.key").exists()


@pytest.mark.parametrize(
    "url",
    [
        "http://admin:hunter2-secret@127.0.0.1:6380/0",
        "redis://:hunter2-secret@127.0.0.1:notaport/0",
        "redis://:hunter2-secret@/0",
        "ftp://u:hunter2-secret@[::1/0",
    ],
)
def test_a_bad_redis_url_is_reported_without_its_password(url: str, tmp_path: Path) -> None:
    env = {**os.environ, "NEBULA_REDIS_URL": url, "NEBULA_STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "nebula.daemons", "scheduler"],
        env=env, capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "redis_url" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout

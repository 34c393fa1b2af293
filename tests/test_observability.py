"""Prometheus (Debian's) against a live stack: it finds every process and engine through
the router's discovery endpoint, and every dashboard query and alert rule runs on it."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from harness.cluster import Cluster
from harness.endpoints import announce
from harness.processes import free_port, http_bytes, spawn, stop, wait_for_port
from nebula.models import Endpoint, Status
from nebula.store import State

ROOT = Path(__file__).parents[1]
DASHBOARDS = ROOT / "dashboards"
ADMIN_KEY = "obs-admin-key"
READ_KEY = "obs-read-key"  # what Prometheus holds: it can read, not change
# Panels about GPUs have no data on a machine without one.
GPU_ONLY = re.compile(r"nebula_node_gpu_")


def prom_query(url: str, expr: str) -> dict:  # type: ignore[type-arg]
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
        return json.load(r)  # type: ignore[no-any-return]


def dashboard_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((path.stem, panel["title"], target["expr"]))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    text = (DASHBOARDS / "alerts.yml").read_text()
    # Each rule: `- alert: NAME` then `expr:` (one line, or a `|` block).
    rules = []
    for block in re.split(r"\n\s+- alert: ", text)[1:]:
        name = block.split("\n", 1)[0].strip()
        expr = re.search(r"expr: (\|\n(?:\s{10}.*\n)+|.*\n)", block)
        assert expr, name
        rules.append((name, " ".join(expr.group(1).lstrip("|").split())))
    return rules


async def spend_a_budget(router_url: str) -> None:
    """A key with a budget of one token, spent, then refused (for the budget panel).
    Last: with a stored key, the router is no longer open."""
    status, _, body = http_bytes(
        "POST", router_url + "/admin/keys", {"name": "tiny-budget", "token_budget": 1}, ADMIN_KEY
    )
    assert status == 201, body
    key = json.loads(body)["key"]
    chat = {"model": "tiny_chat", "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.monotonic() + 15
    while http_bytes("GET", router_url + "/v1/models", key=key)[0] != 200:
        assert time.monotonic() < deadline, "the router never learned of the key"
        await asyncio.sleep(0.2)
    assert http_bytes("POST", router_url + "/v1/chat/completions", chat, key)[0] == 200
    # Refused from here on (the exact stop is tests/security/test_tenants.py's): the
    # panel needs refusals, two of them at least.
    statuses = [http_bytes("POST", router_url + "/v1/chat/completions", chat, key)[0]
                for _ in range(6)]  # fmt: skip
    assert statuses.count(429) >= 2 and statuses[-1] == 429, statuses


@pytest.fixture
async def stack(redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    # On demand: the embedding model is loaded by its first request (the panels on
    # holds and on-demand loads have something to show).
    cluster = Cluster(redis_url, tmp_path, extra_env={"NEBULA_ON_DEMAND": "true"})
    cluster.start_router(NEBULA_ADMIN_KEY=ADMIN_KEY, NEBULA_ADMIN_READ_KEYS=READ_KEY)
    yield cluster
    cluster.close()


def test_dashboards_are_built_from_build_py(tmp_path: Path) -> None:
    """The committed JSON is what dashboards/build.py makes (edit the script, not the JSON)."""
    copy = tmp_path / "dashboards"
    shutil.copytree(DASHBOARDS, copy)
    subprocess.run([ROOT / ".venv/bin/python", copy / "build.py"], check=True, capture_output=True)
    for path in DASHBOARDS.glob("*.json"):
        assert json.loads(path.read_text()) == json.loads((copy / path.name).read_text())


def test_promtool_accepts_the_rules_and_config() -> None:
    rules = subprocess.run(
        ["promtool", "check", "rules", str(DASHBOARDS / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 9 rules found" in rules.stdout


async def test_prometheus_scrapes_everything_and_every_query_runs(
    stack: Cluster, state: State, tmp_path: Path
) -> None:
    assert stack.router is not None
    chat = await stack.load(state, "tiny_chat")
    await stack.status(state, chat.id, Status.READY)
    # Something for every panel to show: a model that fits nowhere (no GPU here), and a
    # replica that is unreachable (retries and upstream errors).
    pending = await stack.load(state, "gpu_chat")
    await stack.status(state, pending.id, Status.PENDING)
    await announce(state, Endpoint("p-dead", chat.id, "tiny_chat", "node-a", "http://127.0.0.1:9"))

    # Prometheus, scraping every second through the router's discovery endpoint.
    key_file = tmp_path / "admin-read.key"
    key_file.write_text(READ_KEY)
    config = (DASHBOARDS / "prometheus.yml").read_text()
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
    config = config.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
    config = config.replace("refresh_interval: 15s", "refresh_interval: 1s")
    config = config.replace("http://127.0.0.1:8080", stack.router.url)
    config = config.replace("/etc/nebula/admin-read.key", str(key_file))
    config = config.replace("- alerts.yml", f"- {DASHBOARDS / 'alerts.yml'}")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    prometheus = spawn(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        tmp_path / "prometheus.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, timeout=30)
        deadline = time.monotonic() + 30
        while True:  # listening is not ready: it answers 503 until its storage is up
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
                await asyncio.sleep(0.2)

        def up_jobs() -> set[str]:
            with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=5) as r:
                targets = json.load(r)["data"]["activeTargets"]
            return {t["labels"]["job"] for t in targets if t["health"] == "up"}

        deadline = time.monotonic() + 60
        while up_jobs() != {"engine", "scheduler", "agent", "router"}:
            assert time.monotonic() < deadline, f"targets up: {up_jobs()}"
            await asyncio.sleep(0.5)

        # Traffic: chats, streamed chats, embeddings, and a few errors.
        with openai.OpenAI(base_url=stack.router.url + "/v1", api_key="x", max_retries=0) as api:
            for round_ in range(6):
                for i in range(5):
                    api.chat.completions.create(
                        model="tiny_chat", messages=[{"role": "user", "content": f"hi {i}"}]
                    )
                    stream = api.chat.completions.create(
                        model="tiny_chat", stream=True,
                        messages=[{"role": "user", "content": "a b c"}],
                    )  # fmt: skip
                    for _ in stream:
                        pass
                    api.embeddings.create(model="tiny_embedding", input="x")
                with pytest.raises(openai.NotFoundError):
                    api.embeddings.create(model="no-such-model", input="x")
                await asyncio.sleep(1.0 if round_ < 5 else 0)
        await spend_a_budget(stack.router.url)
        await asyncio.sleep(4)  # a few more scrapes, so rates have two samples

        failures = []
        for dashboard, title, expr in dashboard_queries():
            result = prom_query(url, expr.replace("$model", "tiny_chat"))
            if result["status"] != "success":
                failures.append(f"{dashboard} / {title}: {expr}: {result}")
            elif not result["data"]["result"] and not GPU_ONLY.search(expr):
                failures.append(f"{dashboard} / {title}: no data for {expr}")
        for name, expr in alert_exprs():
            result = prom_query(url, expr)
            if result["status"] != "success":
                failures.append(f"alert {name}: {expr}: {result}")
        assert not failures, "\n".join(failures)
        # The rules are loaded and evaluated.
        with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=5) as r:
            groups = json.load(r)["data"]["groups"]
        assert len(groups[0]["rules"]) == 9
        assert all(rule["health"] == "ok" for rule in groups[0]["rules"]), groups
    finally:
        stop(prometheus)

"""Least privilege in a real Redis with ACLs (`nebula redis-acl`): each role's user is
refused outside its keys, and a whole stack runs with one user per role. Both
failed on the code before (30e7774 and after): there was no such command, and
every process wrote with one all-powerful user."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from harness.cluster import Cluster
from harness.processes import RedisServer, http_bytes
from nebula.models import Status
from nebula.store import State
from tests.security.conftest import ADMIN_KEY


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    """A redis-server run with the users `nebula redis-acl` writes; each user's URL."""
    folder = tmp_path / "acl"
    server = RedisServer(tmp_path / "acl-data")
    done = subprocess.run(
        [sys.executable, "-m", "nebula.daemons", "redis-acl", "--out", str(folder),
         "--nodes", "node-a"],
        env={"NEBULA_REDIS_URL": server.url, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    server.extra = ("--aclfile", str(folder / "users.acl"))
    server.start()
    urls = {p.stem: p.read_text().strip() for p in folder.glob("*.url")}
    yield server, urls
    server.stop()


def attempt(url: str, *command: str) -> str:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.execute_command(*command)
        return "ok"
    except redis.exceptions.NoPermissionError:
        return "refused"
    except redis.exceptions.AuthenticationError:
        return "no login"
    finally:
        client.close()


REFUSED = {
    "router": [
        ("HSET", "nebula:placements:node-a", "p", "{}"),  # what a node runs
        ("HSET", "nebula:api-keys", "mine", "{}"),
        ("SET", "nebula:scheduler:leader", "me"),
        ("HSET", "nebula:endpoint-index", "p", "{}"),
        ("HSET", "nebula:node:node-a", "address", "10.6.6.6"),
        ("FLUSHALL",),
        ("CONFIG", "SET", "dir", "/tmp"),
    ],
    "agent-node-a": [
        ("HSET", "nebula:placements:node-a", "p", "{}"),
        ("HSET", "nebula:request:r", "status", "Ready"),
        ("HSET", "nebula:api-keys", "mine", "{}"),
        ("HSET", "nebula:node:node-b", "address", "10.6.6.6"),  # another node's heartbeat
        ("HSET", "nebula:placement-state:node-b", "p", "{}"),
        ("INCRBY", "nebula:spend:team:2026-12", "-1000"),
        ("KEYS", "*"),
    ],
    "scheduler": [
        ("HSET", "nebula:api-keys", "mine", "{}"),
        ("INCRBY", "nebula:spend:team:2026-12", "-1000"),
        ("SET", "nebula:rate:abc", "0"),
        ("FLUSHDB",),
    ],
    "admin": [
        ("HSET", "nebula:placements:node-a", "p", "{}"),
        ("SET", "nebula:scheduler:leader", "me"),
        ("HSET", "nebula:node:node-a", "address", "10.6.6.6"),
        ("SHUTDOWN",),
    ],
}
ALLOWED = {
    "router": [("INCR", "nebula:rate:abc"), ("ZADD", "nebula:last-used", "1", "m")],
    "agent-node-a": [("HSET", "nebula:node:node-a", "address", "127.0.0.1")],
    "scheduler": [("HSET", "nebula:placements:node-a", "p", "{}")],
    "admin": [("HSET", "nebula:api-keys", "k", "{}"), ("SADD", "nebula:cordoned", "n")],
}


def test_each_role_is_refused_outside_its_keys(acl_redis: tuple[RedisServer, dict]) -> None:
    _, urls = acl_redis
    for user, commands in REFUSED.items():
        for command in commands:
            assert attempt(urls[user], *command) == "refused", (user, command)
        for command in ALLOWED[user]:
            assert attempt(urls[user], *command) == "ok", (user, command)
        assert attempt(urls[user], "HGETALL", "nebula:placements:node-a") == "ok"  # reads
    # Nobody gets in without a user; the operator's user may do anything.
    assert attempt(urls["router"].replace("router:", "default:"), "PING") == "no login"
    assert attempt(urls["nebula-ops"], "HSET", "nebula:placements:node-a", "p", "{}") == "ok"


async def test_a_whole_stack_runs_with_one_user_per_role(
    acl_redis: tuple[RedisServer, dict[str, str]], tmp_path: Path
) -> None:
    _, urls = acl_redis
    cluster = Cluster(
        urls["nebula-ops"],
        tmp_path,
        role_urls={"scheduler": urls["scheduler"], "node": urls["agent-node-a"]},
    )
    try:
        router = cluster.start_router(
            NEBULA_REDIS_URL=urls["admin"], NEBULA_ADMIN_KEY=ADMIN_KEY, NEBULA_API_KEYS=""
        )
        status, _, body = http_bytes(
            "POST", router.url + "/admin/keys", {"name": "team", "token_budget": 10_000},
            ADMIN_KEY,
        )  # fmt: skip
        assert status == 201, body
        key = json.loads(body)["key"]
        status, _, body = http_bytes(
            "POST", router.url + "/admin/models", {"model": "tiny_chat"}, ADMIN_KEY
        )
        assert status == 201, body
        async with State(urls["nebula-ops"]) as state:
            await cluster.status(state, "tiny_chat", Status.READY, timeout=60)
            with openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        answer = client.chat.completions.create(
                            model="tiny_chat", messages=[{"role": "user", "content": "acl"}]
                        )
                        break
                    except (openai.AuthenticationError, openai.APIStatusError):
                        assert time.monotonic() < deadline
                        time.sleep(0.3)
            assert answer.usage is not None
            status, _, body = http_bytes("GET", router.url + "/admin/keys/team", key=ADMIN_KEY)
            assert json.loads(body)["spent"] == answer.usage.total_tokens
            status, _, body = http_bytes(
                "DELETE", router.url + "/admin/models/tiny_chat", key=ADMIN_KEY
            )
            assert status == 202, body
            await cluster.gone(state, "tiny_chat", timeout=60)
        logs = [cluster.agent_log(), router.log.read_text()]
        logs += [(tmp_path / name).read_text() for name in ("scheduler.log", "node.log")]
        for text in logs:
            assert "NOPERM" not in text and "NoPermission" not in text, text[-3000:]
    finally:
        cluster.close()

"""nebula-cli and nebula-shell against a live stack: real Redis, scheduler, router,
and a node (supervisord, agent) running the project's test engine."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pexpect
import pyte
import pytest

from harness.cluster import Cluster

ADMIN_KEY = "cli-admin-key"
API_KEY = "cli-client-key"


@pytest.fixture
async def stack(redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(redis_url, tmp_path)
    cluster.start_router(NEBULA_ADMIN_KEY=ADMIN_KEY, NEBULA_API_KEYS=API_KEY)
    yield cluster
    cluster.close()


def cli(
    stack: Cluster, *args: str, admin_key: str = ADMIN_KEY, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    assert stack.router is not None
    env = {**os.environ, "NEBULA_URL": stack.router.url, "NEBULA_ADMIN_KEY": admin_key}
    return subprocess.run(
        [sys.executable, "-m", "nebula.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


async def test_every_command_against_a_live_stack(stack: Cluster) -> None:
    catalog = json.loads(ok(cli(stack, "catalog", "list", "--json")))
    assert {m["name"] for m in catalog} == {
        "tiny_chat",
        "slow_chat",
        "broken_chat",
        "gpu_chat",
        "tiny_embedding",
    }
    assert "tiny_chat" in ok(cli(stack, "catalog", "list"))

    loaded = ok(cli(stack, "model", "load", "tiny_chat", "--replicas", "1", "--wait"))
    assert "loading tiny_chat as tiny_chat-" in loaded and "tiny_chat is Ready" in loaded
    # --json anywhere on the line: before the group as after the command.
    for args in (("--json", "model", "list"), ("model", "list", "--json")):
        [row] = json.loads(ok(cli(stack, *args)))
        assert row["model"] == "tiny_chat", args
    [model] = json.loads(ok(cli(stack, "model", "list", "--json")))
    assert model["status"] == "Ready" and model["ready_replicas"] == 1
    table = ok(cli(stack, "model", "list")).splitlines()
    assert table[0].split() == [
        "ID", "MODEL", "STATUS", "READY", "KEEP-ALIVE", "IDLE", "LAST", "USED", "MESSAGE"
    ]  # fmt: skip
    assert "\033[" not in table[1]  # no colour when not on a terminal
    assert table[1].split()[1:5] == ["tiny_chat", "Ready", "1/1", "never"]
    assert re.fullmatch(r"\d+s", table[1].split()[5])  # idle since it became Ready

    shown = json.loads(ok(cli(stack, "model", "show", "tiny_chat", "--json")))
    assert [p["state"] for p in shown["placements"]] == ["Healthy"]
    assert shown["events"][0]["message"] == "load asked: 1 replica(s)"
    human = ok(cli(stack, "model", "show", model["id"]))
    assert "status    Ready: 1/1 replicas healthy" in human and "events:" in human

    status = json.loads(ok(cli(stack, "cluster", "status", "--json")))
    assert [n["id"] for n in status["nodes"]] == ["node-a"]
    assert [e["model"] for e in status["endpoints"]] == ["tiny_chat"]
    assert "node-a" in ok(cli(stack, "cluster", "status"))
    assert ok(cli(stack, "model", "wait", "tiny_chat")).strip().endswith("tiny_chat Ready 1/1")

    assert [n["id"] for n in json.loads(ok(cli(stack, "node", "list", "--json")))] == ["node-a"]
    assert ok(cli(stack, "node", "cordon", "node-a")).strip() == "node node-a cordoned"
    [node] = json.loads(ok(cli(stack, "node", "list", "--json")))
    assert node["cordoned"] and not node["draining"]
    assert "cordoned" in ok(cli(stack, "node", "list"))
    assert ok(cli(stack, "node", "uncordon", "node-a")).strip() == "node node-a uncordoned"

    unloaded = ok(cli(stack, "model", "unload", "tiny_chat", "--wait"))
    assert "unloading tiny_chat" in unloaded and "tiny_chat is gone" in unloaded
    assert json.loads(ok(cli(stack, "model", "list", "--json"))) == []
    assert "no models loaded" in ok(cli(stack, "model", "list"))


async def test_keep_alive_pin_and_unpin(stack: Cluster) -> None:
    ok(cli(stack, "model", "load", "tiny_chat", "--keep-alive", "10m", "--wait"))
    [model] = json.loads(ok(cli(stack, "model", "list", "--json")))
    assert (model["keep_alive"], model["pinned"], model["on_demand"]) == ("10m", False, False)
    assert model["idle_s"] is not None and model["last_used"] is None
    assert "10m" in ok(cli(stack, "cluster", "status"))

    assert "tiny_chat is pinned" in ok(cli(stack, "model", "pin", "tiny_chat"))
    [model] = json.loads(ok(cli(stack, "model", "list", "--json")))
    assert (model["keep_alive"], model["pinned"]) == ("never", True)
    unpinned = ok(cli(stack, "model", "unpin", "tiny_chat", "--keep-alive", "1h"))
    assert "unloads after 1h idle" in unpinned

    refused = cli(stack, "model", "load", "tiny_embedding", "--keep-alive", "soon")
    assert refused.returncode == 1 and "keep_alive must be a duration" in refused.stderr
    missing = cli(stack, "model", "pin", "nope")
    assert missing.returncode == 1 and "no model request 'nope'" in missing.stderr


async def test_errors_have_one_line_and_exit_codes_scripts_can_trust(stack: Cluster) -> None:
    def fails(code: int, message: str, *args: str, **kw: str) -> None:
        result = cli(stack, *args, **kw)  # type: ignore[arg-type]
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        # One line; a failed engine's last log lines follow it, indented.
        first, *rest = result.stderr.strip().splitlines()
        assert first.startswith("error: ") and all(line.startswith("    ") for line in rest)

    fails(1, "'llama' is not in the catalog", "model", "load", "llama")
    fails(
        1,
        "known models: broken_chat, gpu_chat, slow_chat, tiny_chat, tiny_embedding",
        "model",
        "load",
        "x",
    )
    fails(1, "replicas must be between 1 and 256", "model", "load", "tiny_chat", "--replicas", "0")
    ok(cli(stack, "model", "load", "tiny_embedding"))
    fails(1, "already loaded", "model", "load", "tiny_embedding")
    fails(1, "invalid admin key", "model", "list", admin_key="wrong")
    fails(1, "no model request 'nope'", "model", "show", "nope")
    fails(1, "no node 'ghost'", "node", "drain", "ghost")
    fails(2, "the following arguments are required: name", "model", "load")
    fails(2, "invalid choice: 'explode'", "model", "explode")
    fails(
        3,
        "cannot reach Nebula at http://127.0.0.1:9",
        "--url",
        "http://127.0.0.1:9",
        "model",
        "list",
    )
    fails(4, "broken_chat failed: no replica can run: 2 failed; last: could not start", "model",
          "load", "broken_chat", "--wait", "--timeout", "60")  # fmt: skip
    ok(cli(stack, "model", "load", "gpu_chat"))  # stays Pending: no GPU here
    fails(5, "gave up waiting", "model", "wait", "gpu_chat", "--timeout", "1")
    fails(4, "broken_chat failed", "model", "wait", "broken_chat", "gpu_chat", "--timeout", "9")


class Terminal:
    """A program in a pseudo-terminal, its screen rendered by a terminal emulator."""

    def __init__(self, args: list[str], env: dict[str, str], rows: int = 40, cols: int = 120):
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.Stream(self.screen)
        self.proc = pexpect.spawn(
            args[0], args[1:], env=env, encoding="utf-8", dimensions=(rows, cols)
        )

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def wait(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Until the screen shows `pattern` (a regular expression)."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.text(), re.MULTILINE)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed {pattern!r}:\n{self.text()}")
            with contextlib.suppress(pexpect.TIMEOUT):
                self.stream.feed(self.proc.read_nonblocking(4096, timeout=0.1))

    def send(self, keys: str) -> None:
        self.proc.send(keys)

    def clear(self) -> None:
        """Forget what the screen showed, so later waits see only new output."""
        self.screen.reset()


async def test_keys_with_scopes_budgets_and_usage(stack: Cluster) -> None:
    assert stack.router is not None
    created = json.loads(
        ok(cli(stack, "key", "create", "team-a", "--models", "tiny_*", "--no-on-demand",
               "--budget", "5000", "--period", "month", "--priority", "high", "--json"))
    )  # fmt: skip
    assert created["models"] == ["tiny_*"] and created["token_budget"] == 5000
    assert created["key"].startswith("sk-nebula-")
    human = ok(cli(stack, "key", "create", "team-b"))
    assert "every model, on-demand loads" in human and "shown this once" in human
    refused = cli(stack, "key", "create", "team-c", "--budget", "0")
    assert refused.returncode == 1 and "`token_budget` must be a whole number" in refused.stderr
    taken = cli(stack, "key", "create", "team-a")
    assert taken.returncode == 1 and "exists" in taken.stderr

    ok(cli(stack, "model", "load", "tiny_chat", "--wait"))
    client = openai.OpenAI(base_url=stack.router.url + "/v1", api_key=created["key"])
    deadline = time.monotonic() + 30
    while True:  # the router learns of the key at its next table refresh
        try:
            answer = client.chat.completions.create(
                model="tiny_chat", messages=[{"role": "user", "content": "one two"}]
            )
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "the router never learned of the key"
            time.sleep(0.2)
    assert answer.usage is not None
    spent = answer.usage.total_tokens

    listed = ok(cli(stack, "key", "list"))
    assert "team-a" in listed and "5000 tokens/month" in listed and "team-b" in listed
    shown = json.loads(ok(cli(stack, "key", "show", "team-a", "--json")))
    assert shown["spent"] == spent and shown["priority"] == "high"
    assert f"{spent} tokens spent in" in ok(cli(stack, "key", "show", "team-a"))

    deadline = time.monotonic() + 15
    while True:  # usage is written once a second
        report = json.loads(ok(cli(stack, "key", "usage", "--key", "team-a", "--json")))
        if report["usage"]:
            break
        assert time.monotonic() < deadline, "no usage recorded"
        time.sleep(0.3)
    [row] = report["usage"]
    assert (row["model"], row["requests"], row["total_tokens"]) == ("tiny_chat", 1, spent)
    assert "tiny_chat" in ok(cli(stack, "key", "usage", "--model", "tiny_chat"))
    bad = cli(stack, "key", "usage", "--days", "0")
    assert bad.returncode == 1 and "`days` must be" in bad.stderr

    assert "deleted" in ok(cli(stack, "key", "delete", "team-a"))
    gone = cli(stack, "key", "show", "team-a")
    assert gone.returncode == 1 and "no API key named 'team-a'" in gone.stderr


def test_shell_in_a_terminal(stack: Cluster, tmp_path: Path) -> None:
    assert stack.router is not None
    env = {
        **os.environ,
        "NEBULA_URL": stack.router.url,
        "NEBULA_ADMIN_KEY": ADMIN_KEY,
        "NEBULA_API_KEY": API_KEY,
        "HOME": str(tmp_path),  # history goes under HOME
        "TERM": "xterm",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }
    term = Terminal([sys.executable, "-m", "nebula.cli.shell"], env)
    try:
        term.wait("nebula>$")
        term.send("mod\t")  # Tab completes the command...
        term.wait("nebula> model")
        term.send(" load tiny_c\t")  # ...and catalog names from the live cluster
        term.wait("nebula> model load tiny_chat")
        term.send("\r")
        term.wait("loading tiny_chat as tiny_chat-")
        term.clear()
        term.send("model load slow_chat\r")
        term.wait("loading slow_chat")
        term.clear()
        term.send("model wait tiny_chat slow_chat\r")
        term.wait("tiny_chat Ready 1/1  slow_chat Ready 1/1")
        term.clear()
        term.send("model show tiny_chat-\t")  # request ids complete too
        term.wait(r"model show tiny_chat-[0-9a-f]{6}")
        term.send("\r")
        term.wait("status    Ready")

        term.clear()
        term.send("chat tiny_chat\r")
        term.wait("tiny_chat>$")
        term.send("hello there\r")
        term.wait("echo: hello there")
        term.send("\x04")  # Ctrl-D leaves the conversation
        term.wait("nebula>$")

        term.clear()
        term.send("chat slow_chat\r")  # words 300 ms apart: watch them come, then cancel
        term.wait("slow_chat>$")
        term.send("one two three four five six seven\r")
        answer = term.wait("echo: one.*$")
        assert "seven" not in answer.group(0)  # streamed: the answer is not all there yet
        term.send("\x03")  # Ctrl-C cancels the answer, not the shell
        term.wait(r"\[answer cancelled\]")
        term.send("/exit\r")
        term.wait("nebula>$")

        term.clear()
        term.send("key create shell-team --models tiny_chat\r")
        term.wait("key shell-team created: models tiny_chat")
        term.clear()
        term.send("key show shell-\t")  # key names complete
        term.wait("key show shell-team")
        term.send("\r")
        term.wait("tokens spent in")

        term.clear()
        term.send("watch 0.3\r")
        term.wait("press any key to stop")
        term.wait("node-a")
        term.send("q")
        term.wait("nebula>$")
        term.send("\x04")  # Ctrl-D leaves the shell
        term.proc.expect(pexpect.EOF, timeout=10)
    finally:
        term.proc.close()
    assert term.proc.exitstatus == 0
    assert "model load slow_chat" in (tmp_path / ".local/state/nebula/shell-history").read_text()

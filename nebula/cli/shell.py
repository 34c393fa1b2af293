"""nebula-shell: an interactive prompt with nebula-cli's commands, and more.

    cluster status, model list|load|unload|show, node ..., catalog list
                     the same commands as nebula-cli (and the same flags)
    watch [SECONDS]  cluster status, refreshed in place until a key is pressed
    chat MODEL       a conversation that streams the answers; Ctrl-C cancels an
                     answer, Ctrl-D (or /exit) leaves the conversation
    help, exit       (Ctrl-D leaves too)

Tab completes commands, catalog names, loaded models, request ids and nodes
from the live cluster. History persists in ~/.local/state/nebula/shell-history.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import sys
import termios
import time
import tty
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory

from nebula.cli import main as cli
from nebula.cli.client import AdminClient, ClientError, Target, Unreachable

COMMANDS: dict[str, list[str]] = {
    "cluster": ["status"],
    "model": ["list", "load", "unload", "show", "wait", "pin", "unpin"],
    "node": ["list", "cordon", "uncordon", "drain"],
    "catalog": ["list"],
    "key": ["create", "list", "show", "delete", "usage"],
    "watch": [],
    "chat": [],
    "help": [],
    "exit": [],
}
HISTORY = Path("~/.local/state/nebula/shell-history").expanduser()


class Live:
    """Names from the cluster for completion, fetched at most every few seconds."""

    def __init__(self, client: AdminClient, max_age_s: float = 3.0) -> None:
        self.client = client
        self.max_age_s = max_age_s
        self._at = 0.0
        self.catalog: list[str] = []
        self.loaded: list[str] = []  # model names and request ids
        self.ready: list[str] = []
        self.nodes: list[str] = []
        self.keys: list[str] = []

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._at < self.max_age_s:
            return
        self._at = time.monotonic()
        try:
            self.catalog = [m["name"] for m in self.client.catalog()]
            models = self.client.models()
            self.loaded = sorted({m["model"] for m in models} | {m["id"] for m in models})
            self.ready = sorted(m["model"] for m in models if m["ready_replicas"])
            self.nodes = [n["id"] for n in self.client.nodes()]
            self.keys = [k["name"] for k in self.client.api_keys()]  # needs the full admin key
        except (ClientError, Unreachable):
            pass  # completion degrades to what was fetched


class ShellCompleter(Completer):
    def __init__(self, live: Live) -> None:
        self.live = live

    def _choices(self, words: list[str]) -> Iterable[str]:
        if len(words) <= 1:
            return COMMANDS
        head = words[0]
        if len(words) == 2:
            if head == "chat":
                self.live.refresh()
                return self.live.ready
            return COMMANDS.get(head, [])
        if len(words) == 3 and head == "model":
            self.live.refresh()
            if words[1] == "load":
                return self.live.catalog
            if words[1] in ("unload", "show", "wait", "pin", "unpin"):
                return self.live.loaded
        if len(words) == 3 and head == "key" and words[1] in ("show", "delete"):
            self.live.refresh()
            return self.live.keys
        if len(words) == 4 and head == "key" and words[1] == "usage" and words[2] == "--key":
            self.live.refresh()
            return self.live.keys
        if len(words) == 3 and head == "node" and words[1] in ("cordon", "uncordon", "drain"):
            self.live.refresh()
            return self.live.nodes
        return []

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split()
        if text.endswith(" ") or not words:
            words.append("")
        prefix = words[-1]
        matches = [c for c in self._choices(words) if c.startswith(prefix)]
        if not matches and len(words) > 2:
            self.live.refresh(force=True)  # something new since the last look?
            matches = [c for c in self._choices(words) if c.startswith(prefix)]
        for choice in matches:
            yield Completion(choice, start_position=-len(prefix))


def watch(client: AdminClient, interval: float) -> None:
    """Cluster status, redrawn every `interval` seconds until a key is pressed."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setcbreak(fd)
    try:
        while True:
            sys.stdout.write("\033[H\033[2J")
            print(f"nebula cluster status, every {interval:g}s; press any key to stop\n")
            cli.run(["cluster", "status"], sys.stdout, sys.stderr, client)
            sys.stdout.flush()
            ready, _, _ = select.select([fd], [], [], interval)
            if ready:
                os.read(fd, 1024)
                return
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def chat(client: AdminClient, model: str, session: PromptSession[str]) -> None:
    """A conversation with `model` through the router; the history is kept and sent."""
    print(f"chatting with {model}: Ctrl-C cancels an answer, Ctrl-D or /exit leaves")
    messages: list[dict[str, str]] = []
    while True:
        try:
            text = session.prompt(f"{model}> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            print()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        answer: list[str] = []
        stream = client.chat_stream(model, messages)
        try:
            for piece in stream:
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
            messages.append({"role": "assistant", "content": "".join(answer)})
        except KeyboardInterrupt:
            print("\n[answer cancelled]")
            messages.pop()  # the question goes with its unfinished answer
        except (ClientError, Unreachable) as exc:
            print(f"\nerror: {exc.message}")
            messages.pop()
        finally:
            stream.close()


def execute(line: str, client: AdminClient, session: PromptSession[str]) -> bool:
    """Run one line; False to leave the shell."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        print(f"error: {exc}")
        return True
    if not words:
        return True
    head = words[0]
    if head in ("exit", "quit"):
        return False
    if head == "help":
        print(__doc__.split("\n\n", 1)[1] if __doc__ else "")
        return True
    if head == "watch":
        try:
            watch(client, float(words[1]) if len(words) > 1 else 2.0)
        except ValueError:
            print("usage: watch [SECONDS]")
        return True
    if head == "chat":
        if len(words) != 2:
            print("usage: chat MODEL")
            return True
        chat(client, words[1], session)
        return True
    with contextlib.suppress(SystemExit):  # --help exits the parser, not the shell
        cli.run(words, sys.stdout, sys.stdout, client)
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="nebula-shell", description=__doc__.split("\n")[0])
    p.add_argument("--url", help="router URL (default NEBULA_URL, else http://127.0.0.1:8080)")
    args = p.parse_args(argv)
    target = Target.from_environment(args.url)
    client = AdminClient(target)
    HISTORY.parent.mkdir(parents=True, exist_ok=True)
    session: PromptSession[Any] = PromptSession(
        history=FileHistory(str(HISTORY)),
        completer=ShellCompleter(Live(client)),
        complete_while_typing=False,
    )
    print(f"nebula-shell on {target.url}; Tab completes, `help` lists commands, Ctrl-D leaves")
    while True:
        try:
            line = session.prompt("nebula> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            print()
            return 0
        if not execute(line, client, session):
            return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one module that drives supervisord: program files and XML-RPC.

Engines are supervisord programs, one file each in a folder that only the
agent writes and supervisord includes. Convergence is idempotent: writing an
unchanged file changes nothing, and "already started", "not running", "already
added" and "no such group" are all success, so running the same convergence
twice does nothing the second time.

supervisord's XML-RPC is blocking; calls run in a thread.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import Faults, SupervisorTransport

from nebula.agent.programs import Program, log_path
from nebula.errors import InvalidRequest, NebulaError
from nebula.names import has_control, shown

# Faults that mean "already as asked".
IDEMPOTENT = {
    "start": {Faults.ALREADY_STARTED},
    "stop": {Faults.NOT_RUNNING, Faults.BAD_NAME},
    "add": {Faults.ALREADY_ADDED},
    "remove": {Faults.BAD_NAME},
}


class SupervisorUnavailable(NebulaError):
    code = "supervisor_unavailable"


PROGRAM_RE = re.compile(r"^engine-[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
# configparser, which supervisord uses, ends a value at ";" or "#" after whitespace.
INLINE_COMMENT_RE = re.compile(r"\s[;#]")


class UnsafeProgram(InvalidRequest):
    """A value that would not stay one value in supervisord's config file."""

    code = "unsafe_program"


def _value(value: str, what: str) -> str:
    """`value` as one INI value: nothing that ends the line or the value, `%` escaped."""
    if has_control(value):
        raise UnsafeProgram(f"{what} holds a control character: {shown(value)}")
    if INLINE_COMMENT_RE.search(value):
        raise UnsafeProgram(f"{what} holds ' ;' or ' #', which supervisord reads as a comment")
    # supervisord expands %(name)s in values: a literal % is %%.
    return value.replace("%", "%%")


def render(program: Program, logs_dir: Path, max_restarts: int) -> str:
    """The program's file. Every value is checked to stay on its own line and in its own
    field: whatever an engine argument holds, it can never add a section or a key."""
    if not PROGRAM_RE.match(program.name):
        raise UnsafeProgram(f"{shown(program.name)} is not an engine program name")
    pairs = []
    for name, value in sorted(program.environment.items()):
        if not ENV_NAME_RE.match(name):
            raise UnsafeProgram(f"{shown(name)} is not an environment variable name")
        # supervisord splits environment= with its own quoting rules; values with quotes
        # or backslashes do not survive them intact, so none is written.
        if any(c in value for c in "\"'\\"):
            raise UnsafeProgram(f"environment {name} holds a quote or a backslash")
        pairs.append(f'{name}="{_value(value, f"environment {name}")}"')
    for name, source in sorted(program.inherited.items()):
        # Copied from supervisord's own environment when it starts the engine, so
        # the value (a key) is never written to the file.
        if not ENV_NAME_RE.match(name) or not ENV_NAME_RE.match(source):
            raise UnsafeProgram(f"{shown(name)}/{shown(source)} is not an environment variable")
        pairs.append(f'{name}="%(ENV_{source})s"')
    lines = [
        f"[program:{program.name}]",
        f"command={_value(shlex.join(program.command), 'the engine command')}",
        f"environment={','.join(pairs)}" if pairs else "",
        "autostart=true",
        "autorestart=true",
        # An exit within startsecs counts as a failed start; startretries of those and
        # supervisord gives up (FATAL). Later crashes are counted by the agent.
        "startsecs=1",
        f"startretries={max_restarts}",
        # The engine and every child it forks (vLLM's engine core and workers) stop together.
        "stopasgroup=true",
        "killasgroup=true",
        "stopsignal=TERM",
        "stopwaitsecs=30",
        f"stdout_logfile={log_path(logs_dir, program.name)}",
        "redirect_stderr=true",
        "stdout_logfile_maxbytes=20MB",
        "stdout_logfile_backups=2",
    ]
    return "\n".join(line for line in lines if line) + "\n"


# How much of a log `tail` reads: enough for the last lines of a traceback.
TAIL_BYTES = 16384


class Supervisor:
    def __init__(self, socket_path: Path, programs_dir: Path, logs_dir: Path) -> None:
        self.socket_path = socket_path
        self.programs_dir = programs_dir
        self.logs_dir = logs_dir

    def _call(self, method: str, *args: Any) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            return getattr(proxy, method)(*args)
        except OSError as exc:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {self.socket_path} ({exc}); is `nebula node` running?"
            ) from None
        finally:
            transport.close()

    async def call(self, method: str, *args: Any, ok: set[int] | None = None) -> Any:
        try:
            return await asyncio.to_thread(self._call, method, *args)
        except xmlrpc.client.Fault as fault:
            if ok and fault.faultCode in ok:
                return None
            raise

    # Program files.

    def path(self, name: str) -> Path:
        return self.programs_dir / f"{name}.conf"

    def write(self, program: Program, max_restarts: int) -> bool:
        """Write the program's file; True if it changed."""
        text = render(program, self.logs_dir, max_restarts)
        path = self.path(program.name)
        if path.exists() and path.read_text() == text:
            return False
        self.programs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        # 0600: command lines and environments are nobody else's business (the engine
        # key is not in it: `render` writes a reference to supervisord's environment).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(path)
        return True

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def files(self) -> set[str]:
        if not self.programs_dir.is_dir():
            return set()
        return {p.stem for p in self.programs_dir.glob("*.conf")}

    # Processes.

    async def reload(self) -> tuple[list[str], list[str], list[str]]:
        """Re-read the program files: (added, changed, removed) group names."""
        [[added, changed, removed]] = await self.call("supervisor.reloadConfig")
        return added, changed, removed

    async def apply(self, ours: set[str]) -> list[str]:
        """Load the program files: start the ones in `ours` that are new, restart the
        ones in `ours` that changed. Whatever reloadConfig reports, only these are
        started: a group the agent did not write is never run; its names are
        returned, for the log."""
        added, updated, _ = await self.reload()
        for name in added:
            if name in ours:
                await self.add(name)
        for name in updated:
            if name in ours:
                await self.remove(name)
                await self.add(name)
        return sorted((set(added) | set(updated)) - ours)

    async def add(self, name: str) -> None:
        await self.call("supervisor.addProcessGroup", name, ok=IDEMPOTENT["add"])

    async def remove(self, name: str) -> None:
        await self.call("supervisor.stopProcessGroup", name, True, ok=IDEMPOTENT["stop"])
        await self.call("supervisor.removeProcessGroup", name, ok=IDEMPOTENT["remove"])

    async def start(self, name: str) -> None:
        await self.call("supervisor.startProcess", name, False, ok=IDEMPOTENT["start"])

    async def stop(self, name: str) -> None:
        await self.call("supervisor.stopProcess", name, True, ok=IDEMPOTENT["stop"])

    async def processes(self) -> dict[str, dict[str, Any]]:
        """Every process supervisord knows, by name."""
        infos = await self.call("supervisor.getAllProcessInfo")
        return {info["name"]: info for info in infos}

    async def ping(self) -> str:
        return str(await self.call("supervisor.getState"))

    async def tail(self, name: str, lines: int = 20) -> str:
        """The last lines of a program's log (its own stdout and stderr), as supervisord
        reads them; "" for a program it does not know."""
        try:
            text, _, _ = await self.call("supervisor.tailProcessStdoutLog", name, 0, TAIL_BYTES)
        except (xmlrpc.client.Fault, SupervisorUnavailable):
            return ""
        return "\n".join(str(text).splitlines()[-lines:])

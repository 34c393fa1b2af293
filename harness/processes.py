"""Real servers for tests: redis-server on a free loopback port."""

from __future__ import annotations

import itertools
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing uses now, for a process that cannot bind port 0 and say which it
    got (redis-server, Sentinel, Prometheus). It is taken below the kernel's ephemeral
    range: a port the kernel hands out by itself (a connection's own end, another
    process's port 0) never falls there, so none can take it before its user binds it."""
    high = _ephemeral_low() - 1
    low = max(1024, high - 12_000)
    for _ in range(200):
        port = _random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use
            return port
    raise RuntimeError(f"no free port between {low} and {high}")


_random = random.Random()


_ENGINES = itertools.count()


def _reported_port(
    path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0
) -> int:
    """The port a process wrote to `path` once it listened there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return int(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name} exited ({proc.returncode}):\n{tail(log, 20)}")
        time.sleep(0.02)
    raise RuntimeError(f"{log.name} reported no port within {timeout:g}s:\n{tail(log, 20)}")


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """A throwaway redis-server; `stop()` and `start()` again on the same port and data."""

    def __init__(
        self, folder: Path, *, aof: bool = False, extra: tuple[str, ...] = (), port: int = 0
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run shell/test, which installs it")
        self.binary = binary
        self.folder = folder
        self.aof = aof  # AOF everysec, as production runs it: kill -9 and restart keep data
        self.extra = extra  # more redis-server arguments (--replicaof HOST PORT, ...)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes" if self.aof else "no",
                "--appendfsync",
                "everysec",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        if self.proc.poll() is not None:  # something else answered on the port
            raise RuntimeError(f"redis-server on port {self.port} exited ({self.proc.returncode})")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test paused it
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """kill -9: no shutdown, no final fsync; only what the AOF had survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> object:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=5)
        try:
            return client.execute_command(*args)
        finally:
            client.close()


def http_bytes(
    method: str,
    url: str,
    body: object = None,
    key: str | None = None,
    raw: bytes | None = None,
    timeout: float = 20,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with a JSON body (or `raw` bytes) and a bearer key: status, headers,
    body, whatever the status."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process with its output in `log`."""
    import os

    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            args,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class ShutdownCutShort(UserWarning):
    """A process stopped in time only by cutting its own shutdown short (see
    `nebula.process.bounded`): shown in the warnings summary, not a failure."""


def stop(proc: subprocess.Popen[bytes], timeout: float = 10, log: Path | None = None) -> int:
    """SIGTERM, then SIGKILL after `timeout`; a process that needed the kill has the
    end of its `log` shown (pytest prints it with the failure), or nobody learns why."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        if log is not None:
            print(
                f"pid {proc.pid} ignored SIGTERM for {timeout}s; the end of {log}:\n"
                + tail(log, 60),
                file=sys.stderr,
            )
        return proc.wait(timeout)


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


class EngineProcess:
    """Nebula's test engine in its own process, on a port it binds itself (port 0:
    no other process can take it between the choice and the bind) and reports."""

    def __init__(self, model: str, folder: Path, api_key: str = "", *extra: str) -> None:
        self.model = model
        name = f"engine-{model}-{next(_ENGINES)}"
        self.log = folder / f"{name}.log"
        port_file = folder / f"{name}.port"
        self.proc = spawn(
            [
                sys.executable,
                "-m",
                "nebula.testengine",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--model",
                model,
                "--api-key",
                api_key,
                *extra,
            ],
            self.log,
        )
        self.port = _reported_port(port_file, self.proc, self.log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def behave(self, **changes: object) -> None:
        import json
        import urllib.request

        req = urllib.request.Request(
            self.url + "/test/behaviour", data=json.dumps(changes).encode(), method="POST"
        )
        urllib.request.urlopen(req, timeout=5).read()

    def served(self) -> int:
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + "/test/stats", timeout=5) as r:
            return int(json.load(r)["served"])

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


class RouterProcess:
    """`nebula router` in its own process, on a free port."""

    def __init__(self, redis_url: str, folder: Path, workers: int = 1, **env: str) -> None:
        name = f"router-{next(_ROUTERS)}"
        self.log = folder / f"{name}.log"
        port_file = folder / f"{name}.port"
        self.env = {
            "NEBULA_REDIS_URL": redis_url,
            # A port the router binds itself and reports (unless a test gives one: a
            # router started again where the last one was).
            "NEBULA_ROUTER_PORT": "0",
            "NEBULA_ROUTER_PORT_FILE": str(port_file),
            "NEBULA_ROUTING_REFRESH_S": "0.2",
            # Stops well within the 10 s `stop` gives it; a test of the drain sets its own.
            "NEBULA_ROUTER_DRAIN_S": "0.5",
            **env,
        }
        self.proc = spawn(
            [sys.executable, "-m", "nebula.daemons", "router", "--workers", str(workers)],
            self.log,
            self.env,
        )
        self.port = _reported_port(port_file, self.proc, self.log)
        wait_for_port(self.port, timeout=20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        code = stop(self.proc, log=self.log)
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if "stopping anyway" in text:
            # It stopped in time, but only by cutting its shutdown short: a hang to find.
            cut = ShutdownCutShort(f"router shutdown was cut short:\n{tail(self.log, 40)}")
            warnings.warn(cut, stacklevel=2)
        return code


_ROUTERS = itertools.count()


# tests/conftest.py's `start_engines` fixture: (n, api_key, *flags) -> the engines.
StartEngines = Callable[..., list[EngineProcess]]

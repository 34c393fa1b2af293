"""The processes bench/router.py compares: an upstream and the proxies in front of it.

nginx answers as vLLM would (bench/payloads.py); Nebula's test engine streams.
In front of them: a bare aiohttp proxy, `nebula router` and, when installed,
vllm-router (one instance per upstream: it routes among identical workers, not
by model).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from bench import payloads
from harness.endpoints import announce
from harness.processes import (
    EngineProcess,
    RedisServer,
    RouterProcess,
    free_port,
    spawn,
    stop,
    wait_for_port,
)
from nebula.models import Endpoint
from nebula.store import State

STREAM_MODEL = "bench-stream"

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir};
  proxy_temp_path {dir};
  fastcgi_temp_path {dir};
  uwsgi_temp_path {dir};
  scgi_temp_path {dir};
  server {{
    listen 127.0.0.1:{port};
    default_type application/json;
    # Too long for a `return`: served from a file (a POST to a file is a 405, which
    # becomes a GET of it).
    location = /v1/embeddings {{ error_page 405 =200 /embeddings.json; return 405; }}
    location = /embeddings.json {{ root {dir}; }}
    location / {{ return 200 '{chat}'; }}
  }}
}}
"""


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / 100  # clock ticks (USER_HZ is 100 on Linux)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Peers:
    """Starts everything on enter and stops it, by PID, on exit."""

    def __init__(self, tmp: Path, workers: int, key: str, vllm_router: str | None) -> None:
        self.tmp, self.workers, self.key, self.vllm_router = tmp, workers, key, vllm_router
        self.procs: list[subprocess.Popen[bytes]] = []
        self.bases: dict[str, str] = {}  # name -> base URL, for wrk
        self.stream_bases: dict[str, str] = {}  # name -> chat URL of a streaming upstream
        self._pids: dict[str, list[int]] = {}

    def pids(self, name: str) -> list[int]:
        return self._pids.get(name, [])

    def __enter__(self) -> Peers:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _start(self) -> None:
        self.redis = RedisServer(self.tmp / "redis")
        self.redis.start()
        nginx = self._nginx()
        self.engine = EngineProcess(STREAM_MODEL, self.tmp)
        self.procs.append(self.engine.proc)
        self.router = RouterProcess(
            self.redis.url,
            self.tmp,
            workers=self.workers,
            NEBULA_API_KEYS=self.key,
            NEBULA_LOG_LEVEL="WARNING",
        )
        asyncio.run(self._publish(nginx))
        bare = self._bare(nginx)
        self.bases = {"direct": nginx, "bare aiohttp proxy": bare, "nebula router": self.router.url}
        self.stream_bases = {
            "direct": f"{self.engine.url}/v1/chat/completions",
            "nebula router": f"{self.router.url}/v1/chat/completions",
        }
        self._pids["nebula router"] = children(self.router.proc.pid) or [self.router.proc.pid]
        if self.vllm_router is not None:
            self.bases["vllm-router"] = self._vllm_router(nginx, "nginx")
            streamed = self._vllm_router(self.engine.url, "engine")
            self.stream_bases["vllm-router"] = f"{streamed}/v1/chat/completions"
            self._pids["vllm-router"] = [self.procs[-2].pid]
        self._wait_routed()

    def _nginx(self) -> str:
        port = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=self.tmp,
                port=port,
                chat=payloads.CHAT_ANSWER,
            )
        )
        (self.tmp / "embeddings.json").write_text(payloads.embeddings_answer())
        self.procs.append(subprocess.Popen(["/usr/sbin/nginx", "-c", str(conf)]))
        wait_for_port(port)
        return f"http://127.0.0.1:{port}"

    async def _publish(self, nginx: str) -> None:
        state = State(self.redis.url)
        for model, url, task in (
            (payloads.CHAT_MODEL, nginx, "chat"),
            (payloads.EMBED_MODEL, nginx, "embedding"),
            (STREAM_MODEL, self.engine.url, "chat"),
        ):
            await announce(state, Endpoint(f"p-{model}", f"r-{model}", model, "bench", url, task))
        await state.close()

    def _bare(self, upstream: str) -> str:
        port = free_port()
        for _ in range(self.workers):
            args = [sys.executable, "-m", "bench.bare_proxy", upstream, str(port)]
            self.procs.append(subprocess.Popen(args))
            self._pids.setdefault("bare aiohttp proxy", []).append(self.procs[-1].pid)
        wait_for_port(port)
        return f"http://127.0.0.1:{port}"

    def _vllm_router(self, worker: str, name: str) -> str:
        assert self.vllm_router is not None
        port = free_port()
        args = [
            self.vllm_router,
            *("--host", "127.0.0.1", "--port", str(port), "--worker-urls", worker),
            # Its default policy, cache_aware, as Nebula runs its default (prefix).
            *("--api-key", self.key, "--log-level", "warning"),
            *("--prometheus-port", str(free_port())),
        ]
        self.procs.append(spawn(args, self.tmp / f"vllm-router-{name}.log"))
        wait_for_port(port, timeout=60)
        return f"http://127.0.0.1:{port}"

    def _wait_routed(self, timeout: float = 30.0) -> None:
        """Until every path answers a chat request (every router worker knows the models)."""
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        for name, base in self.bases.items():
            while True:
                request = urllib.request.Request(
                    f"{base}/v1/chat/completions",
                    data=payloads.CHAT_BODY.encode(),
                    headers=headers,
                )
                try:
                    with urllib.request.urlopen(request, timeout=5) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} at {base} never answered a chat request")
                time.sleep(0.2)
        time.sleep(1.0)  # every router worker, not just the one that answered

    def _stop(self) -> None:
        if hasattr(self, "router"):
            self.router.stop()
        for proc in reversed(self.procs):
            stop(proc)
        if hasattr(self, "redis"):
            self.redis.stop()

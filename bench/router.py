"""Router overhead benchmark (run by hand; figures go in the README).

    .venv/bin/python -m bench.router [--workers 2] [--duration 10]

Needs Debian's `wrk` and `nginx-light` (apt-get install wrk nginx-light).
Everything runs on loopback: nginx answers a 200-byte chat completion at once
(the same upstream the peers in the router issue were measured against), and
wrk (one thread) drives it directly and through `nebula router` with an API
key and metrics on, at concurrency 1 and 64. Time to first token is measured
with a streamed chat against Nebula's test engine, directly and through the
router. The load generator, upstream and router share the machine's cores.

Figures on a shared 2-core VM swing by tens of percent from run to run, so
each configuration runs `--rounds` times, interleaved with the others (the
upstream directly, a bare aiohttp proxy with as many processes as the router
has workers, and the router), and medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from harness.endpoints import announce
from harness.processes import (
    EngineProcess,
    RedisServer,
    RouterProcess,
    free_port,
    stop,
    wait_for_port,
)
from nebula.models import Endpoint
from nebula.store import State

KEY = "sk-bench"
ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!"},
                "finish_reason": "stop",
            }
        ],
    }
)
BODY = json.dumps({"model": "bench-chat", "messages": [{"role": "user", "content": "Hello"}]})

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
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
    location / {{
      default_type application/json;
      return 200 '{answer}';
    }}
  }}
}}
"""

WRK_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def wrk(url: str, connections: int, duration: int, script: Path) -> tuple[float, float]:
    """Requests per second and p50 latency in ms."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    assert p50 is not None, out
    value, unit = float(p50.group(1)), p50.group(2)
    ms = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return rps, ms


async def ttft(url: str, model: str, n: int) -> float:
    """p50 time to the first streamed chunk, in ms, one request at a time."""
    body = {"model": model, "messages": [{"role": "user", "content": "a b"}], "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            start = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as r:
                await r.content.readany()
                times.append(time.perf_counter() - start)
                await r.read()
    return statistics.median(times) * 1000


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"bench/router.py needs {tool}: apt-get install wrk nginx-light")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        redis = RedisServer(tmp / "redis")
        redis.start()
        nginx_port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, port=nginx_port, answer=ANSWER))
        nginx = subprocess.Popen(["/usr/sbin/nginx", "-c", str(conf)])
        wait_for_port(nginx_port)
        engine = EngineProcess("bench-stream", tmp)
        router = RouterProcess(
            redis.url, tmp, workers=args.workers, NEBULA_API_KEYS=KEY, NEBULA_LOG_LEVEL="WARNING"
        )
        try:

            async def publish() -> None:
                state = State(redis.url)
                for model, url in (
                    ("bench-chat", f"http://127.0.0.1:{nginx_port}"),
                    ("bench-stream", engine.url),
                ):
                    await announce(state, Endpoint(f"p-{model}", f"r-{model}", model, "bench", url))
                await state.close()

            asyncio.run(publish())
            time.sleep(1.5)  # every worker's routing table
            script = tmp / "post.lua"
            script.write_text(WRK_LUA.format(body=json.dumps(BODY), key=KEY))
            bare_port = free_port()
            bare = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.bare_proxy",
                        f"http://127.0.0.1:{nginx_port}",
                        str(bare_port),
                    ]
                )
                for _ in range(args.workers)
            ]
            wait_for_port(bare_port)
            targets = {
                "direct": f"http://127.0.0.1:{nginx_port}/v1/chat/completions",
                "bare aiohttp proxy": f"http://127.0.0.1:{bare_port}/v1/chat/completions",
                "nebula router": f"{router.url}/v1/chat/completions",
            }
            for url in targets.values():
                wrk(url, 8, 2, script)  # warm up
            print(
                f"{args.workers} worker(s)/process(es), wrk -t1, {args.duration}s per run, "
                f"median of {args.rounds} interleaved runs:"
            )
            for c in (1, 64):
                runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
                for _ in range(args.rounds):
                    for name, url in targets.items():
                        runs[name].append(wrk(url, c, args.duration, script))
                direct_p50 = statistics.median(p for _, p in runs["direct"])
                for name in targets:
                    rps = statistics.median(r for r, _ in runs[name])
                    p50 = statistics.median(p for _, p in runs[name])
                    added = "" if name == "direct" else f"  added p50 {p50 - direct_p50:+.3f} ms"
                    print(f"  c={c:<3} {name:<20} {rps:8.0f} req/s  p50 {p50:7.3f} ms{added}")
            for proc in bare:
                proc.terminate()
            routed = targets["nebula router"]
            d_ttft = asyncio.run(ttft(engine.url + "/v1/chat/completions", "bench-stream", 300))
            r_ttft = asyncio.run(ttft(routed, "bench-stream", 300))
            print(
                f"  streamed, c=1: time to first token p50 direct {d_ttft:.3f} ms, "
                f"router {r_ttft:.3f} ms, added {r_ttft - d_ttft:+.3f} ms"
            )
            workers = children(router.proc.pid) or [router.proc.pid]
            rss = [rss_mib(pid) for pid in workers if Path(f"/proc/{pid}").exists()]
            print(f"  router memory after the runs: {', '.join(f'{m:.0f} MiB' for m in rss)}")
        finally:
            router.stop()
            stop(engine.proc)
            nginx.terminate()
            nginx.wait(10)
            redis.stop()


if __name__ == "__main__":
    main()

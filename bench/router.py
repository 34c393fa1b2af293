"""Router overhead on realistic traffic (run by hand; figures go in the README).

    .venv/bin/python -m bench.router [--workers 2] [--duration 5] [--rounds 3]
        [--vllm-router PATH] [--profile DIR]

Needs Debian's `wrk` and `nginx-light` (apt-get install wrk nginx-light).
Everything runs on loopback. nginx stands in for vLLM and answers at once, with
answers shaped as vLLM's (bench/payloads.py): a chat completion with `usage`,
and an embeddings answer of 16 x 384 floats (130 kB). wrk (one thread) sends a
2 kB chat request (a system prompt and a user turn) and a 16-input embeddings
request, at concurrency 1 and 64, to each path side by side:

- direct: nginx itself, the limit;
- bare aiohttp proxy: bench/bare_proxy.py, as many processes as the router has
  workers: what any Python proxy pays;
- nebula router: `nebula router --workers N` with an API key and metrics on;
- vllm-router: the Rust router from PyPI, with its default policy (cache_aware, as
  Nebula runs its default, prefix), when it is installed (it is looked for
  with --vllm-router, then on PATH, then in .venv-vllm-router/; install it with
  `python3 -m venv .venv-vllm-router && .venv-vllm-router/bin/pip install vllm-router`).

Streams: time to first token through each path, to Nebula's test engine,
one request at a time and 32 at once. The CPU each router process used during
the c=64 chat runs gives the requests per core-second. --profile records the
router's workers with py-spy during one more c=64 chat run and prints the
frames where they spent their time.

Figures on a shared 2-core VM swing by tens of percent from run to run, so each
configuration runs `--rounds` times, interleaved with the others, and medians are
reported. The load generator, upstream and routers share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import payloads
from bench.router_peers import Peers, cpu_seconds, rss_mib
from bench.router_tools import profile, ttft, wrk

KEY = "sk-bench"
SCENARIOS = {
    "chat": ("/v1/chat/completions", payloads.CHAT_BODY),
    "embeddings": ("/v1/embeddings", payloads.EMBED_BODY),
}
WRK_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def find_vllm_router(given: str | None) -> str | None:
    for candidate in (given, shutil.which("vllm-router"), ".venv-vllm-router/bin/vllm-router"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def throughput(peers: Peers, scripts: dict[str, Path], args: argparse.Namespace) -> None:
    """wrk through every path, interleaved rounds, medians."""
    for scenario, (path, _) in SCENARIOS.items():
        if args.only and scenario not in args.only:
            continue
        for c in (1, 64):
            runs: dict[str, list[tuple[float, float, int]]] = {n: [] for n in peers.bases}
            cpu: dict[str, float] = dict.fromkeys(peers.bases, 0.0)
            for _ in range(args.rounds):
                for name, base in peers.bases.items():
                    before = cpu_seconds(peers.pids(name))
                    runs[name].append(wrk(base + path, c, args.duration, scripts[scenario]))
                    cpu[name] += cpu_seconds(peers.pids(name)) - before
            report(scenario, c, runs, cpu)


def report(
    scenario: str, c: int, runs: dict[str, list[tuple[float, float, int]]], cpu: dict[str, float]
) -> None:
    direct_p50 = statistics.median(p for _, p, _ in runs["direct"])
    bare_rps = statistics.median(r for r, _, _ in runs["bare aiohttp proxy"])
    for name, results in runs.items():
        rps = statistics.median(r for r, _, _ in results)
        p50 = statistics.median(p for _, p, _ in results)
        line = f"  {scenario:<10} c={c:<3} {name:<19} {rps:8.0f} req/s  p50 {p50:7.3f} ms"
        if name != "direct":
            line += f"  added {p50 - direct_p50:+.3f} ms  {rps / bare_rps:4.2f}x bare"
        requests = sum(n for _, _, n in results)
        if name != "direct" and cpu[name] > 0 and c == 64:
            line += f"  {requests / cpu[name]:6.0f} req per core-second"
        print(line, flush=True)


def streams(peers: Peers) -> None:
    for concurrency in (1, 32):
        direct = None
        for name, base in peers.stream_bases.items():
            p50 = asyncio.run(ttft(base, KEY, concurrency, 300))
            direct = p50 if direct is None else direct
            added = "" if name == "direct" else f"  added {p50 - direct:+.3f} ms"
            print(f"  stream     c={concurrency:<3} {name:<19} TTFT p50 {p50:7.3f} ms{added}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm-router", help="path of vllm-router (default: looked for)")
    parser.add_argument("--profile", type=Path, help="py-spy the router into this folder")
    parser.add_argument(
        "--only", choices=["chat", "embeddings", "streams"], action="append", help="repeatable"
    )
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"bench/router.py needs {tool}: apt-get install wrk nginx-light")
    vllm_router = find_vllm_router(args.vllm_router)
    if vllm_router is None:
        print(
            "vllm-router not found: measured without it (python3 -m venv .venv-vllm-router "
            "&& .venv-vllm-router/bin/pip install vllm-router)"
        )
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        scripts = {}
        for scenario, (_, body) in SCENARIOS.items():
            scripts[scenario] = tmp / f"{scenario}.lua"
            scripts[scenario].write_text(WRK_LUA.format(body=json.dumps(body), key=KEY))
        with Peers(tmp, args.workers, KEY, vllm_router) as peers:
            for scenario, (path, _) in SCENARIOS.items():
                for base in peers.bases.values():
                    wrk(base + path, 8, 1, scripts[scenario])  # warm up
            print(
                f"{args.workers} worker(s)/process(es), wrk -t1, {args.duration}s per run, "
                f"median of {args.rounds} interleaved runs:",
                flush=True,
            )
            throughput(peers, scripts, args)
            if not args.only or "streams" in args.only:
                streams(peers)
            rss = [rss_mib(pid) for pid in peers.pids("nebula router")]
            print(f"  router memory after the runs: {', '.join(f'{m:.0f} MiB' for m in rss)}")
            if args.profile is not None:
                url = peers.bases["nebula router"] + SCENARIOS["chat"][0]
                started = time.monotonic()
                profile(peers.pids("nebula router"), args.profile, url, scripts["chat"])
                print(f"  profile: {args.profile} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        sys.exit(f"{exc.cmd[0]} failed: {exc.stderr or exc.stdout}")

"""Measuring tools for bench/router.py: wrk, time to first token, and py-spy."""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.router_peers import STREAM_MODEL


def wrk(url: str, connections: int, duration: int, script: Path) -> tuple[float, float, int]:
    """Requests per second, p50 latency in ms, and requests answered."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    assert p50 is not None, out
    value, unit = float(p50.group(1)), p50.group(2)
    ms = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return rps, ms, done


async def ttft(url: str, key: str, concurrency: int, n: int) -> float:
    """p50 time to the first streamed chunk, in ms, `concurrency` streams at a time."""
    body = {"model": STREAM_MODEL, "messages": [{"role": "user", "content": "a b"}], "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    times: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            start = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status}: {await r.text()}")
                await r.content.readany()
                times.append(time.perf_counter() - start)
                await r.read()

        async def loop(count: int) -> None:
            for _ in range(count):
                await one()

        await loop(5)  # warm up: connections opened
        times.clear()
        await asyncio.gather(*(loop(n // concurrency) for _ in range(concurrency)))
    return statistics.median(times) * 1000


def profile(pids: list[int], folder: Path, url: str, script: Path, seconds: int = 10) -> None:
    """py-spy each process while wrk drives `url` at c=64; write and print the top frames."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    folder.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            [
                *(spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250"),
                *("--format", "raw", "--nonblocking", "--output", str(folder / f"{pid}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    time.sleep(1)
    _, _, requests = wrk(url, 64, seconds - 2, script)
    for spy_proc in spies:
        spy_proc.wait(timeout=seconds + 30)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for path in folder.glob("*.txt"):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            n = int(count)
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    report = [
        f"{total} samples ({total / requests * 1000:.0f} per 1000 requests, at 250 a "
        "second of CPU); own time (the frame itself):"
    ]
    report += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(25)]
    report += ["inclusive (the frame and what it called):"]
    report += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(40)]
    (folder / "top.txt").write_text("\n".join(report) + "\n")
    print("\n".join(report))

"""Prefix-affine routing against least-outstanding, on real vLLM CPU (run by hand).

    .venv/bin/python -m bench.prefix [--conversations 8] [--turns 3] [--words 500]

Starts Redis, the scheduler, one node and two SmolLM2 replicas (vLLM's CPU
build, prefix caching on by default), and two routers over the same replicas:
one with `routing_policy=least_outstanding`, one with `prefix`. Each policy
then serves the same workload in turn: N conversations, each with its own
long system prompt (random words, a fresh set per policy so neither warms the
other's cache), several turns each, two conversations at a time in a shuffled
order each turn (the same for both policies), answers of 8
tokens, streamed. Reported per policy: time to first token p50/p90 over all
turns and over the turns after the first, and vLLM's own prefix-cache hit
rate (`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`, over
both engines) against the ideal (every turn after the first finds the
conversation so far cached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from harness.cluster import Cluster, wait_for
from harness.processes import RedisServer, RouterProcess
from nebula.models import Status
from nebula.settings import Settings
from nebula.store import State

MODEL = "smollm2_135m_chat"
WORDS = ["river", "stone", "lantern", "orbit", "meadow", "signal", "copper", "harbor",
         "violet", "engine", "summit", "thread", "canyon", "ember", "quartz", "willow"]  # fmt: skip


def conversations(seed: int, n: int, words: int) -> list[list[dict[str, str]]]:
    out = []
    for c in range(n):
        rng = random.Random(seed * 1000 + c)
        system = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append([{"role": "system", "content": f"Conversation {seed}-{c}. Notes: {system}"}])
    return out


def engine_counters(url: str) -> tuple[float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)", text, re.M))

    return total("vllm:prefix_cache_hits_total"), total("vllm:prefix_cache_queries_total")


async def turn(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]]
) -> tuple[float, str, int]:
    """One streamed turn: (time to first token, the answer, prompt tokens)."""
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}  # fmt: skip
    started = time.perf_counter()
    ttft = None
    text, prompt_tokens = "", 0
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - started
                text += piece
            if event.get("usage"):
                prompt_tokens = int(event["usage"]["prompt_tokens"])
    return (ttft if ttft is not None else time.perf_counter() - started), text, prompt_tokens


async def run_policy(url: str, engines: list[str], convs: list[list[dict[str, str]]],
                     turns: int) -> dict[str, float]:  # fmt: skip
    before = [engine_counters(e) for e in engines]
    ttfts: list[float] = []
    later: list[float] = []
    ideal_hits = 0
    prompts = 0
    last_prompt = [0] * len(convs)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(c: int, t: int) -> None:
            nonlocal ideal_hits, prompts
            convs[c].append({"role": "user", "content": f"Question {t}: what is note {t}?"})
            ttft, answer, tokens = await turn(session, url, convs[c])
            convs[c].append({"role": "assistant", "content": answer})
            ttfts.append(ttft)
            if t:
                later.append(ttft)
                ideal_hits += last_prompt[c] // 16 * 16  # vLLM caches whole 16-token blocks
            prompts += tokens
            last_prompt[c] = tokens

        rng = random.Random(7)  # the same order for both policies
        for t in range(turns):
            # Users come back in any order: a fixed order would pair the same
            # conversations each turn and give least-outstanding an accidental affinity.
            order = list(range(len(convs)))
            rng.shuffle(order)
            for pair in range(0, len(order), 2):
                await asyncio.gather(*(one(c, t) for c in order[pair : pair + 2]))
    after = [engine_counters(e) for e in engines]
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]

    return {
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": pct(ttfts, 90),
        "later_p50": statistics.median(later),
        "later_p90": pct(later, 90),
        "hit_rate": hits / queries if queries else 0.0,
        "ideal": ideal_hits / prompts if prompts else 0.0,
    }


async def main(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="nebula-bench-prefix-"))
    redis = RedisServer(folder / "redis")
    redis.start()
    catalog = (Path(__file__).parents[1] / "nebula" / "catalog.toml").read_text()
    cluster = Cluster(redis.url, folder, catalog_text=catalog, extra_env={
        "NEBULA_MODELS_DIR": str(Settings().models_dir),
        "NEBULA_PROBE_INTERVAL_S": "1",
        "NEBULA_ENGINE_START_TIMEOUT_S": "900",
    })  # fmt: skip
    routers: dict[str, RouterProcess] = {}
    try:
        async with State(redis.url) as state:
            request = await cluster.load(state, MODEL, 2)
            started = time.monotonic()
            await cluster.status(state, request.id, Status.READY, timeout=900)
            print(f"2 replicas of {MODEL} Ready in {time.monotonic() - started:.0f}s")
            engines = sorted(e.url for e in (await state.endpoints.live()))
        for policy in ("least_outstanding", "prefix"):
            routers[policy] = cluster.start_router(NEBULA_ROUTING_POLICY=policy)

        async def both() -> bool:
            for router in routers.values():
                with urllib.request.urlopen(router.url + "/health", timeout=5) as r:
                    if json.load(r)["endpoints"] < 2:
                        return False
            return True

        await wait_for(both, 60, "both routers to see both replicas")
        results = {}
        for seed, policy in enumerate(("least_outstanding", "prefix"), start=1):
            convs = conversations(seed, args.conversations, args.words)
            results[policy] = await run_policy(routers[policy].url, engines, convs, args.turns)
        print(f"\n{args.conversations} conversations x {args.turns} turns, system prompts of "
              f"{args.words} words, 2 at a time, 2 replicas (SmolLM2-135M, vLLM CPU)")  # fmt: skip
        print(f"{'policy':<18} {'TTFT p50':>9} {'p90':>8} {'later p50':>10} {'p90':>8} "
              f"{'hit rate':>9} {'ideal':>7}")  # fmt: skip
        for policy, r in results.items():
            print(f"{policy:<18} {r['ttft_p50']:>8.2f}s {r['ttft_p90']:>7.2f}s "
                  f"{r['later_p50']:>9.2f}s {r['later_p90']:>7.2f}s {r['hit_rate']:>9.1%} "
                  f"{r['ideal']:>7.1%}")  # fmt: skip
        lo, px = results["least_outstanding"], results["prefix"]
        print(f"prefix vs least_outstanding, turns after the first: TTFT p50 "
              f"{lo['later_p50'] / px['later_p50']:.1f}x better; hit rate "
              f"{px['hit_rate'] / px['ideal']:.0%} of the ideal")  # fmt: skip
    finally:
        for router in routers.values():
            router.stop()
        cluster.close()
        redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--words", type=int, default=500)
    asyncio.run(main(parser.parse_args()))

"""Cache-aware routing against least-outstanding, on the workloads production has
(run by hand).

    .venv/bin/python -m bench.prefix                  # real vLLM CPU, 2 SmolLM2 replicas
    .venv/bin/python -m bench.prefix --engine test --replicas 4 --workers 2

Workloads, each policy from cold with its own fresh prompts of the same shapes,
sent in the same order:

    own       16 conversations, each its own 3,000-character system prompt
    shared    16 conversations of one app: one 3,000-character system prompt for
              all, then each user's own 1,500-character document
    shared32  the same with 32 conversations, 8 in flight

4 turns each, a turn of every conversation before the next, `--in-flight` at a
time (8 for shared32), answers of 8 tokens, streamed. Reported per workload and
policy, in the engine's tokens from each answer's `usage` (vLLM with
`--enable-prompt-tokens-details`; the test engine counts 4 characters a
token): the prefix-cache hit rate against the ideal (every turn after the
first finds its conversation so far cached, and every conversation but the
first finds the shared prompt, in the whole cache blocks the engine keeps:
128 tokens on vLLM's CPU build); the same for the conversations' own part (the
prompt past the shared system prompt); the later turns that found all of their
previous turn cached ("followed"); the busiest and idlest replica's share of
requests; and the time to first token of later turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from harness import workloads
from harness.cluster import ENGINE_KEY as KEY
from harness.cluster import Cluster, vllm_env, wait_for
from harness.endpoints import announce
from harness.processes import EngineProcess, RedisServer, RouterProcess, stop
from nebula import redis_keys
from nebula.models import Endpoint, Status
from nebula.store import State
from nebula.testengine.prompts import prompt_text

MODEL = "smollm2_135m_chat"
POLICIES = ("least_outstanding", "prefix")
ENGINE_KEY = "bench-prefix"


@dataclass(frozen=True)
class Workload:
    name: str
    conversations: int
    in_flight: int
    shared: bool

    def build(
        self, seed: int, system_chars: int, document_chars: int
    ) -> list[list[dict[str, str]]]:
        if self.shared:
            return workloads.shared_prompt(seed, self.conversations, system_chars, document_chars)
        return workloads.own_prompts(seed, self.conversations, system_chars)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("own", 16, 4, False),
        Workload("shared", 16, 4, True),
        Workload("shared32", 32, 8, True),
    )
}


def measure(
    turns: list[workloads.Turn], shared: int, counts: dict[str, int], block: int
) -> dict[str, float]:
    """The figures of one run, in the engine's tokens; `shared`: the shared system
    prompt's tokens (0: none), `block`: the engine's cache block in tokens (vLLM
    caches whole blocks only, of the prompt and of the answer)."""
    hit = ideal = total = own_hit = own_ideal = own_total = 0.0
    followed = 0
    by_turn = {(t.conversation, t.turn): t for t in turns}
    first = next(t.conversation for t in turns if t.turn == 0)  # the first to be answered
    for t in turns:
        if t.turn:  # ideal: the previous turn's prompt and answer, in whole blocks
            before = by_turn[t.conversation, t.turn - 1]
            done = before.prompt_tokens + before.completion_tokens
            best = min(done // block * block, (t.prompt_tokens - 1) // block * block)
            followed += t.cached_tokens >= before.prompt_tokens // block * block
        else:  # ideal: the shared prompt, but for the very first conversation
            best = shared // block * block if t.conversation != first else 0
        hit, ideal, total = hit + t.cached_tokens, ideal + best, total + t.prompt_tokens
        own_hit += max(0, t.cached_tokens - shared)
        own_ideal += max(0, best - shared)
        own_total += t.prompt_tokens - shared
    later = [t.ttft_s for t in turns if t.turn]
    share = [n / sum(counts.values()) for n in counts.values()] if counts else [0.0]
    return {
        "hit": hit / total,
        "ideal": ideal / total,
        "own": own_hit / own_total,
        "own_ideal": own_ideal / own_total,
        "followed": followed / len(later),
        "busiest": max(share),
        "idlest": min(share),
        "later_p50": statistics.median(later),
    }


def decisions(router: str, before: dict[str, float]) -> dict[str, float]:
    """The router's routing decisions by kind, less `before`."""
    with urllib.request.urlopen(router + "/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: dict[str, float] = {}
    for kind, value in re.findall(
        r'^nebula_router_routing_decisions_total{[^}]*decision="(\w+)"[^}]*} (\S+)', text, re.M
    ):
        counts[kind] = counts.get(kind, 0) + float(value) - before.get(kind, 0)
    return counts


def vllm_block_size(url: str) -> int:
    """The engine's cache block in tokens (vLLM's CPU build: 128; on GPU usually 16)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        found = re.search(r'vllm:cache_config_info{[^}]*block_size="(\d+)"', r.read().decode())
    return int(found.group(1)) if found else 16


def vllm_tokens(url: str, messages: list[dict[str, str]]) -> int:
    """The tokens of `messages` as the engine's chat template renders them."""
    body = {"model": MODEL, "messages": messages, "add_generation_prompt": False}
    request = urllib.request.Request(
        url + "/tokenize",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        return int(json.load(r)["count"])


def vllm_requests(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(v) for v in re.findall(r"^vllm:request_success_total{[^}]*} (\S+)", text, re.M)
    )


async def run(
    args: argparse.Namespace,
    urls: dict[str, list[str]],
    replica_counts: Callable[[], dict[str, float]] | None,
) -> None:
    print(
        f"{'workload':<9} {'policy':<18} {'hit (ideal)':>14} {'own part (ideal)':>17} "
        f"{'followed':>9} {'busiest/idlest':>15} {'later TTFT p50':>15}"
    )
    seed = 10
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}  # every turn, for --save
    for name in args.workloads.split(","):
        workload = WORKLOADS[name]
        if args.conversations:  # scaled down (a slow machine): shared32 keeps twice as many
            scale = args.conversations / WORKLOADS["own"].conversations
            workload = Workload(
                name,
                round(workload.conversations * scale),
                max(1, round(workload.in_flight * scale)),
                workload.shared,
            )
        results = {}
        for policy in POLICIES:
            seed += 1
            convs = workload.build(seed, args.system_chars, args.document_chars)
            shared = args.tokens_of(convs[0][:1]) if workload.shared else 0
            before = replica_counts() if replica_counts else {}
            before_decisions = decisions(urls[policy][0], {})
            turns = await workloads.converse(
                urls[policy], args.model, convs, args.turns, workload.in_flight, seed=7
            )
            raw.setdefault(name, {})[policy] = [asdict(t) for t in turns]
            if replica_counts:
                after = replica_counts()
                counts = {k: int(after[k] - before.get(k, 0)) for k in after}
            else:
                counts = {r: round(s * len(turns)) for r, s in workloads.shares(turns).items()}
            r = results[policy] = measure(turns, shared, counts, args.block)
            print(
                f"{name:<9} {policy:<18} {r['hit']:>6.1%} ({r['ideal']:>5.1%}) "
                f"{r['own']:>8.1%} ({r['own_ideal']:>5.1%}) {r['followed']:>9.0%} "
                f"{r['busiest']:>7.0%} / {r['idlest']:<5.0%} {r['later_p50']:>14.3f}s"
            )
            if policy == "prefix":
                print(f"{'':<28} decisions: {decisions(urls[policy][0], before_decisions)}")
        lo, px = results["least_outstanding"], results["prefix"]
        print(
            f"{'':<9} prefix: later-turn TTFT p50 {lo['later_p50'] / px['later_p50']:.1f}x "
            f"better; own part {px['own_ideal'] - px['own']:.1%} points under the ideal"
        )
    if args.save:
        Path(args.save).write_text(json.dumps(raw, indent=1))


async def with_test_engines(args: argparse.Namespace, folder: Path, redis: RedisServer) -> None:
    engines = [
        EngineProcess("chat", folder, ENGINE_KEY, "--prefill-ms-per-kchar", "20")
        for _ in range(args.replicas)
    ]
    routers: dict[str, RouterProcess] = {}
    try:
        async with State(redis.url) as state:
            for i, e in enumerate(engines):
                await announce(state, Endpoint(f"p{i}", "r", "chat", f"n{i}", e.url, "chat"))
        for policy in POLICIES:
            routers[policy] = RouterProcess(
                redis.url,
                folder,
                args.workers,
                NEBULA_ENGINE_API_KEY=ENGINE_KEY,
                NEBULA_ROUTING_POLICY=policy,
            )
        await _routed(routers, args.replicas)
        print(
            f"{args.replicas} test-engine replicas (--prefill-ms-per-kchar 20), "
            f"{args.workers} router worker(s), {args.turns} turns\n"
        )
        args.model = "chat"
        args.block = 16  # 64 characters, 4 a token
        args.tokens_of = lambda messages: len(prompt_text({"messages": messages}, True)) // 4
        await run(args, {p: [r.url] for p, r in routers.items()}, None)
    finally:
        for router in routers.values():
            router.stop()
        for engine in engines:
            stop(engine.proc)


async def with_vllm(args: argparse.Namespace, folder: Path, redis: RedisServer) -> None:
    catalog = (Path(__file__).parents[1] / "nebula" / "catalog.toml").read_text()
    # Each answer's usage says how much of its prompt was cached.
    catalog = catalog.replace(
        'engine_args = ["--max-model-len", "2048", "--enforce-eager"]',
        'engine_args = ["--max-model-len", "2048", "--enforce-eager", '
        '"--enable-prompt-tokens-details"]',
    )
    cluster = Cluster(
        redis.url,
        folder,
        catalog_text=catalog,
        extra_env=vllm_env(NEBULA_PROBE_INTERVAL_S="1"),
    )
    routers: dict[str, RouterProcess] = {}
    try:
        async with State(redis.url) as state:
            request = await cluster.load(state, MODEL, args.replicas)
            started = time.monotonic()
            await cluster.status(state, request.id, Status.READY, timeout=900)
            print(f"{args.replicas} replicas of {MODEL} Ready in {time.monotonic() - started:.0f}s")
            engines = sorted(e.url for e in (await state.endpoints.all()))
        for policy in POLICIES:
            routers[policy] = cluster.start_router(NEBULA_ROUTING_POLICY=policy)
        await _routed(routers, args.replicas)
        print(
            f"{args.replicas} SmolLM2-135M replicas (vLLM CPU, prefix caching on, blocks of "
            f"{vllm_block_size(engines[0])} tokens), {args.turns} turns\n"
        )
        args.model = MODEL
        args.block = vllm_block_size(engines[0])
        args.tokens_of = lambda messages: vllm_tokens(engines[0], messages)
        await run(
            args,
            {p: [r.url] for p, r in routers.items()},
            lambda: {e: vllm_requests(e) for e in engines},
        )
        async with State(redis.url) as state:
            entries: Any = await state.redis.xrange(redis_keys.PREFIX_FEED)
        ops: dict[str, int] = {}
        for _, fields in entries:
            ops[fields.get("o") or "keys"] = ops.get(fields.get("o") or "keys", 0) + 1
        print(f"\nprefix feed entries by kind (evict: vLLM's KV events): {ops}")
    finally:
        for router in routers.values():
            router.stop()
        cluster.close()


async def _routed(routers: dict[str, RouterProcess], replicas: int) -> None:
    async def all_see_all() -> bool:
        for router in routers.values():
            async with aiohttp.ClientSession() as s, s.get(router.url + "/health") as r:
                if json.loads(await r.text())["endpoints"] < replicas:
                    return False
        return True

    await wait_for(all_see_all, 60, "the routers to see every replica")


async def main(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="nebula-bench-prefix-"))
    redis = RedisServer(folder / "redis")
    redis.start()
    try:
        if args.engine == "test":
            await with_test_engines(args, folder, redis)
        else:
            await with_vllm(args, folder, redis)
    finally:
        redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("vllm", "test"), default="vllm")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="router worker processes")
    parser.add_argument("--workloads", default="own,shared,shared32")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--save", default="", help="write every turn's figures to this JSON")
    parser.add_argument(
        "--conversations",
        type=int,
        default=0,
        help="conversations of own and shared (default 16; shared32: twice)",
    )
    parser.add_argument("--system-chars", type=int, default=3000)
    parser.add_argument("--document-chars", type=int, default=1500)
    asyncio.run(main(parser.parse_args()))

"""Conversation workloads for the routing tests and benchmarks: the shapes that
production traffic has, built from a seed so that two policies get the same."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

WORDS = ["river", "stone", "lantern", "orbit", "meadow", "signal", "copper", "harbor",
         "violet", "engine", "summit", "thread", "canyon", "ember", "quartz", "willow"]  # fmt: skip

Message = dict[str, str]


def words(rng: random.Random, chars: int) -> str:
    """Random words, about `chars` characters."""
    out: list[str] = []
    size = 0
    while size < chars:
        out.append(rng.choice(WORDS))
        size += len(out[-1]) + 1
    return " ".join(out)


def own_prompts(seed: int, n: int, system_chars: int) -> list[list[Message]]:
    """N conversations, each with its own system prompt."""
    out = []
    for c in range(n):
        rng = random.Random(seed * 1000 + c)
        system = f"Conversation {seed}-{c}. Notes: {words(rng, system_chars)}"
        out.append([{"role": "system", "content": system}])
    return out


def shared_prompt(seed: int, n: int, system_chars: int, document_chars: int) -> list[list[Message]]:
    """N conversations of one app: the same system prompt for all, then each user's
    own document (a RAG context, a pasted file) in its first message."""
    system = f"App {seed}. Instructions: {words(random.Random(seed), system_chars)}"
    out = []
    for c in range(n):
        rng = random.Random(seed * 1000 + c)
        document = f"User {c}'s document: {words(rng, document_chars)}"
        out.append([{"role": "system", "content": system}, {"role": "user", "content": document}])
    return out


def question(turn: int) -> Message:
    return {"role": "user", "content": f"Question {turn}: what is note {turn}?"}


@dataclass(frozen=True)
class Turn:
    conversation: int
    turn: int
    replica: str  # the answer's system_fingerprint ("" where the engine sets none)
    ttft_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, found in the engine's prefix cache
    completion_tokens: int = 0


@dataclass
class Answer:
    ttft_s: float = 0.0
    text: str = ""
    fingerprint: str = ""
    usage: dict[str, Any] = field(default_factory=dict)


async def ask(
    session: aiohttp.ClientSession, url: str, model: str, messages: list[Message], max_tokens: int
) -> Answer:
    """One streamed chat turn, with its usage."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    started = time.perf_counter()
    ttft, answer = None, Answer()
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            answer.fingerprint = event.get("system_fingerprint") or answer.fingerprint
            answer.usage = event.get("usage") or answer.usage
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - started
                answer.text += piece
    answer.ttft_s = ttft if ttft is not None else time.perf_counter() - started
    return answer


async def converse(
    urls: list[str],
    model: str,
    conversations: list[list[Message]],
    turns: int,
    in_flight: int,
    *,
    max_tokens: int = 8,
    seed: int = 7,
) -> list[Turn]:
    """Every conversation `turns` turns, a turn of all before the next, `in_flight`
    at a time in an order shuffled by `seed` (users come back in any order: a fixed
    order pairs the same conversations each turn). Turn t of conversation c goes
    to `urls[(c + t) % len(urls)]`: with several routers, turns alternate."""
    rng = random.Random(seed)
    out: list[Turn] = []
    gate = asyncio.Semaphore(in_flight)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(c: int, t: int) -> None:
            async with gate:
                messages = conversations[c]
                messages.append(question(t))
                url = urls[(c + t) % len(urls)]
                answer = await ask(session, url, model, messages, max_tokens)
                messages.append({"role": "assistant", "content": answer.text})
                details = answer.usage.get("prompt_tokens_details") or {}
                out.append(
                    Turn(
                        c,
                        t,
                        answer.fingerprint,
                        answer.ttft_s,
                        int(answer.usage.get("prompt_tokens", 0)),
                        int(details.get("cached_tokens") or 0),
                        int(answer.usage.get("completion_tokens", 0)),
                    )
                )

        for t in range(turns):
            order = list(range(len(conversations)))
            rng.shuffle(order)
            await asyncio.gather(*(one(c, t) for c in order))
    return out


def followed(turns: list[Turn]) -> float:
    """Of the turns after the first, the share that went to the previous turn's replica."""
    where = {(t.conversation, t.turn): t.replica for t in turns}
    later = [t for t in turns if t.turn]
    same = sum(where[t.conversation, t.turn - 1] == t.replica for t in later)
    return same / len(later) if later else 0.0


def shares(turns: list[Turn]) -> dict[str, float]:
    """Each replica's share of the requests."""
    counts: dict[str, int] = {}
    for t in turns:
        counts[t.replica] = counts.get(t.replica, 0) + 1
    return {r: n / len(turns) for r, n in sorted(counts.items())}

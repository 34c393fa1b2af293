"""Prefix-affine routing: the same conversation goes where its prompt is cached.

vLLM keeps the KV cache of prompts it has seen (prefix caching); a chat's next
turn repeats the whole conversation so far, so the replica that served the
last turn can skip most of the prefill (measured here: 19.5 s to the first
token cold, 0.6 s warm, SmolLM2 on CPU with a 1,500-word system prompt).

The choice is consistent hashing with bounded load (Mirrokni et al., 2016; the
scheme KubeAI uses): the first `prefix_chars` characters of the prompt are
hashed onto a ring of the model's replicas (many virtual points each); the
request goes to the first replica clockwise whose load is within
`load_factor` of the average, so a hot prefix spills over instead of piling
onto one replica. Why this and not a shared index of what each engine holds:

- every router worker and every router picks the same replica for the same
  prefix from nothing but the replica set they all read, with no round trip
  per request and no shared state to keep;
- when a replica joins or leaves, only the prefixes on its arcs move (about
  1/n of them); the rest keep their caches.

What it cannot see (an engine evicting a prefix, two conversations sharing a
long prefix beyond the hashed part) costs a cache miss, never a wrong answer.
The load each router bounds is its own count of requests in flight, so
routers agree exactly while under the bound and may spill differently above
it. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from nebula.models import Endpoint

POINTS_PER_REPLICA = 160


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prefix_of(payload: dict[str, Any], chars: int) -> str | None:
    """The first `chars` characters of a chat's messages or a completion's prompt."""
    messages = payload.get("messages")
    parts: list[str] = []
    size = 0
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):  # content parts: take the text ones
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            text = f"{message.get('role', '')}:{content}\n"
            parts.append(text)
            size += len(text)
            if size >= chars:
                break
    else:
        prompt = payload.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else None
        if isinstance(prompt, str):
            parts.append(prompt)
    text = "".join(parts)[:chars]
    return text or None


class Ring:
    """One model's replicas on a hash ring."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        points = []
        for e in endpoints:
            for i in range(POINTS_PER_REPLICA):
                points.append((_hash(f"{e.placement_id}#{i}".encode()), e.placement_id))
        points.sort()
        self.hashes = [h for h, _ in points]
        self.owners = [pid for _, pid in points]
        self.by_id = {e.placement_id: e for e in endpoints}

    def walk(self, key: str) -> list[str]:
        """Replica ids in ring order from `key`'s point, each once."""
        start = bisect.bisect(self.hashes, _hash(key.encode()))
        seen: list[str] = []
        n = len(self.owners)
        for i in range(n):
            pid = self.owners[(start + i) % n]
            if pid not in seen:
                seen.append(pid)
                if len(seen) == len(self.by_id):
                    break
        return seen


class PrefixAffinity:
    """Choose by prompt prefix, bounded by load; remembers one ring per replica set."""

    def __init__(self, load_factor: float = 1.25, chars: int = 256) -> None:
        self.load_factor = load_factor
        self.chars = chars
        self._rings: dict[tuple[str, ...], Ring] = {}

    def ring(self, candidates: Sequence[Endpoint]) -> Ring:
        ids = tuple(sorted(e.placement_id for e in candidates))
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) > 256:  # replica sets come and go: keep it bounded
                self._rings.clear()
            ring = self._rings[ids] = Ring(candidates)
        return ring

    def choose(
        self, candidates: Sequence[Endpoint], inflight: Mapping[str, int], key: str
    ) -> tuple[Endpoint, bool]:
        """The replica for `key`, and whether it is the key's own (False: spilled over)."""
        ring = self.ring(candidates)
        order = ring.walk(key)
        total = sum(inflight.get(pid, 0) for pid in order) + 1
        bound = math.ceil(self.load_factor * total / len(order))
        for rank, pid in enumerate(order):
            if inflight.get(pid, 0) + 1 <= bound:
                return ring.by_id[pid], rank == 0
        return ring.by_id[order[0]], True  # unreachable: some replica is under the mean

"""Choosing a replica: pure, no I/O.

The policy sees the candidate endpoints and this router's count of requests
in flight to each. Least outstanding requests is exact with a few replicas;
with many, power of two choices gets nearly the same balance for O(1) work
and avoids every router herding onto the same "least loaded" replica.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from nebula.models import Endpoint


class Policy(Protocol):
    def choose(self, candidates: Sequence[Endpoint], inflight: Mapping[str, int]) -> Endpoint:
        """One of `candidates` (never empty)."""
        ...


class LeastOutstanding:
    """Fewest requests in flight; power of two choices above `sample_above` replicas."""

    def __init__(self, rng: random.Random | None = None, sample_above: int = 4) -> None:
        self.rng = rng or random.Random()
        self.sample_above = sample_above

    def choose(self, candidates: Sequence[Endpoint], inflight: Mapping[str, int]) -> Endpoint:
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > self.sample_above:
            a, b = self.rng.sample(list(candidates), 2)
            return a if inflight.get(a.placement_id, 0) <= inflight.get(b.placement_id, 0) else b
        # Ties are common (idle replicas): start the scan at a random replica.
        start = self.rng.randrange(len(candidates))
        best = candidates[start]
        best_load = inflight.get(best.placement_id, 0)
        for i in range(1, len(candidates)):
            candidate = candidates[(start + i) % len(candidates)]
            load = inflight.get(candidate.placement_id, 0)
            if load < best_load:
                best, best_load = candidate, load
        return best


class Loads(Mapping[str, int]):
    """Requests in flight to each replica as this router knows them: its own count
    (exact, now) plus what the engines last reported beyond it (other routers'
    requests, and what queues in the engine; sampled, a second or two old)."""

    def __init__(self, own: Mapping[str, int]) -> None:
        self.own = own
        self.others: dict[str, int] = {}

    def sampled(self, engines: Mapping[str, int]) -> None:
        """The engines' own counts (running + waiting), per placement id."""
        own = self.own
        self.others = {
            pid: n - own.get(pid, 0) for pid, n in engines.items() if n > own.get(pid, 0)
        }

    def get(self, pid: str, default: int = 0) -> int:  # type: ignore[override]
        return self.own.get(pid, default) + self.others.get(pid, 0)

    def __getitem__(self, pid: str) -> int:
        return self.get(pid)

    def __iter__(self) -> Iterator[str]:
        return iter(set(self.own) | set(self.others))

    def __len__(self) -> int:
        return len(set(self.own) | set(self.others))

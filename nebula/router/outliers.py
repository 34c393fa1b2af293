"""Passive outlier ejection: a replica that could not be reached is left out for a while.

The routing table lists what agents announce. Between an engine's death and its
endpoint's withdrawal (the agent's next probe; a node's TTL, `node_ttl_s`, when
supervisord or the whole machine is gone) requests would keep being sent to it,
each paying a refused connection or, for a machine that vanished, the whole
`connect_timeout_s` before its retry. A failed connect is sure evidence, so the
replica is left out at once: for `BASE_S`, doubling with each failure in a row up
to `MAX_S`. When that runs out the next request tries it again (a success clears
it). Left-out replicas are still tried as a last resort, after every other
candidate: ejection never turns a request away by itself.

Pure (no I/O): the proxy reports connects that failed and answers that came.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from nebula.models import Endpoint

BASE_S = 0.5
# Above the node TTL (8 s): by then a dead node's endpoints are withdrawn anyway.
MAX_S = 10.0


@dataclass(slots=True)
class _Ejection:
    failures: int
    until: float


class Outliers:
    """Replicas left out after failed connects, keyed by engine URL."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.ejected: dict[str, _Ejection] = {}

    def split(self, candidates: Sequence[Endpoint]) -> tuple[Sequence[Endpoint], list[Endpoint]]:
        """(the candidates to try, those left out for now: tried only after them)."""
        if not self.ejected:  # the common case costs one test
            return candidates, []
        now = self.clock()
        usable: list[Endpoint] = []
        out: list[Endpoint] = []
        for endpoint in candidates:
            ejection = self.ejected.get(endpoint.url)
            (out if ejection is not None and ejection.until > now else usable).append(endpoint)
        return usable, out

    def failed(self, endpoint: Endpoint) -> float:
        """A connect to `endpoint` failed: how long it is now left out."""
        ejection = self.ejected.get(endpoint.url)
        failures = 1 if ejection is None else ejection.failures + 1
        seconds = min(MAX_S, BASE_S * 2.0 ** (failures - 1))
        self.ejected[endpoint.url] = _Ejection(failures, self.clock() + seconds)
        return seconds

    def answered(self, endpoint: Endpoint) -> None:
        """`endpoint` answered: it is back."""
        if self.ejected:
            self.ejected.pop(endpoint.url, None)

    def keep_only(self, urls: Iterable[str]) -> None:
        """Forget replicas no longer in the routing table (withdrawn, or moved)."""
        if self.ejected:
            known = set(urls)
            for url in [u for u in self.ejected if u not in known]:
                del self.ejected[url]

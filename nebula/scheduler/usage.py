"""What the current placements take, kept as running sums: pure data, no I/O.

The placement function needs, per GPU and per CPU node, the memory placed
there and the part of it whose engine is not yet running; per node the ports
in use; per request the replicas it runs where. Summing thousands of
placements on every pass costs tens of milliseconds at scale, so the leader
keeps a `Usage` and updates it as placements come, change and go, and
rebuilds it from Redis on every full pass (which also clears any float drift).
`Usage.of` builds one from scratch; tests check that both agree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from nebula.models import Desired, Placement


class Usage:
    def __init__(self) -> None:
        self.placements: dict[str, Placement] = {}
        self.confirmed: set[str] = set()  # engine running: its memory shows in telemetry
        self.by_node: dict[str, set[str]] = defaultdict(set)
        self.by_request: dict[str, set[str]] = defaultdict(set)
        # (node, GPU index) -> [fraction placed, fraction placed but unconfirmed]
        self.gpu: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
        # CPU node -> [GiB placed, GiB placed but unconfirmed]
        self.ram: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.ports: dict[str, set[int]] = defaultdict(set)
        # request -> node -> replicas wanted running there (desired `run`)
        self.run: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.run_total: dict[str, int] = defaultdict(int)  # request -> sum of `run` above
        # (node, GPU index, request) -> placements of the request on that GPU
        self.gpu_holders: dict[tuple[str, int, str], int] = defaultdict(int)

    @classmethod
    def of(cls, placements: Iterable[Placement], confirmed: Iterable[str] = ()) -> Usage:
        usage = cls()
        running = set(confirmed)
        for p in placements:
            usage.put(p, confirmed=p.id in running)
        return usage

    def _apply(self, p: Placement, sign: int, confirmed: bool) -> None:
        unconfirmed = 0.0 if confirmed else 1.0
        if p.devices:
            fraction = sign * (p.spec.gpu_memory_utilization or 0.0)
            for index in p.devices:
                sums = self.gpu[p.node, index]
                sums[0] += fraction
                sums[1] += fraction * unconfirmed
                self.gpu_holders[p.node, index, p.request_id] += sign
        else:
            gib = sign * (p.spec.cpu_memory_gib or 0.0)
            sums = self.ram[p.node]
            sums[0] += gib
            sums[1] += gib * unconfirmed
        if p.desired is Desired.RUN:
            self.run[p.request_id][p.node] += sign
            self.run_total[p.request_id] += sign

    def put(self, p: Placement, *, confirmed: bool | None = None) -> None:
        """Add `p`, or replace the placement with its id (keeping its confirmation by default)."""
        old = self.placements.get(p.id)
        if old is not None:
            was = p.id in self.confirmed
            self._apply(old, -1, was)
            confirmed = was if confirmed is None else confirmed
        self.placements[p.id] = p
        self.by_node[p.node].add(p.id)
        self.by_request[p.request_id].add(p.id)
        self.ports[p.node].add(p.port)
        if confirmed:
            self.confirmed.add(p.id)
        else:
            self.confirmed.discard(p.id)
        self._apply(p, +1, bool(confirmed))

    def drop(self, placement_id: str) -> None:
        p = self.placements.pop(placement_id, None)
        if p is None:
            return
        self._apply(p, -1, placement_id in self.confirmed)
        self.confirmed.discard(placement_id)
        for index, key in ((self.by_node, p.node), (self.by_request, p.request_id)):
            members = index[key]
            members.discard(placement_id)
            if not members:
                del index[key]
        self.ports[p.node].discard(p.port)
        if not self.run[p.request_id].get(p.node):
            self.run[p.request_id].pop(p.node, None)
        if not self.run[p.request_id]:
            del self.run[p.request_id]
        if not self.run_total.get(p.request_id):
            self.run_total.pop(p.request_id, None)

    def confirm(self, placement_id: str, confirmed: bool) -> None:
        """The engine's memory now shows (or no longer shows) in its node's telemetry."""
        p = self.placements.get(placement_id)
        if p is None or (placement_id in self.confirmed) == confirmed:
            return
        self.put(p, confirmed=confirmed)

    def active(self, request_id: str, draining: dict[str, bool]) -> int:
        """Replicas of the request wanted running on live, non-draining nodes."""
        nodes = self.run.get(request_id)
        if not nodes:
            return 0
        return sum(n for node, n in nodes.items() if draining.get(node) is False)

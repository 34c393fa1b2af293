"""How router processes share a model's slots: pure, no I/O.

Every router process reports its demand per model and band once a second
(`store/demand.py`) and reads everyone's. Each then takes its share of the
model's slots (the sum of its replicas' concurrency targets) by the same rule,
so the shares add up to the slots without a round trip per request:

1. bands in order: high demand is met first, across every router process, then
   normal, then low; the band where the slots run out is split in proportion to
   what each process asks in it (largest remainder, so the parts add up);
2. slots nobody asks for are split evenly between the live processes, so that a
   burst at any one of them starts at once, and it asks for more in its next
   report.

The cost: one HSET and one HGETALL per router process per second, whatever the
request rate; a share is up to a report interval old, so when demand moves
between processes the engines may briefly get more than the target (their own
queue takes it) or a process may wait up to a second for its share.
"""

from __future__ import annotations

from collections.abc import Mapping

from nebula.models import Demand


def share(capacity: int, demand: Mapping[str, Demand], me: str) -> int:
    """The slots of a model that process `me` may fill, given every live process's
    demand for it (`me` included, even when it asks for nothing)."""
    left, mine = max(0, capacity), 0
    for band in range(3):
        wants = {who: d.bands[band] for who, d in demand.items() if d.bands[band] > 0}
        total = sum(wants.values())
        if total <= left:
            mine += wants.get(me, 0)
            left -= total
            continue
        mine += _split(left, wants, me)
        return mine
    return mine + _split(left, dict.fromkeys(demand, 1), me)


def _split(slots: int, weights: Mapping[str, int], me: str) -> int:
    """`me`'s part of `slots` divided in proportion to `weights` (largest remainder;
    ties go in name order, so every process computes the same division)."""
    total = sum(weights.values())
    if not total or me not in weights:
        return 0
    floors = {who: slots * w // total for who, w in weights.items()}
    extra = slots - sum(floors.values())
    order = sorted(weights, key=lambda who: (-(slots * weights[who] % total), who))
    return floors[me] + (1 if me in order[:extra] else 0)

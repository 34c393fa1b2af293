"""What each router process asks of each model: the requests it has in flight and
waiting, per priority band. Flow control shares each model's slots between the
router processes by it (`router/flow_share.py`), and the scheduler's autoscaler
follows its sum (`scheduler/autoscale.py`).

Keys (spelled in `nebula.redis_keys`):
- `nebula:router-demand` hash: router process -> JSON
  `{"t": unix time, "m": {model: [high, normal, low, queued]}}` (the first three:
  in flight plus waiting in each band; the last: how many of them wait). Every
  router process writes its field once a second, idle or not, so that readers
  know how many share the slots. A field older than `STALE_S` is ignored, and
  trimmed by the reader; a clean stop removes its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

from nebula import redis_keys
from nebula.models import Demand
from nebula.store.core import Core

# A report older than this is a router that stopped or lost Redis: not counted.
STALE_S = 5.0


class RouterDemand:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def report(self, instance: str, demand: Mapping[str, Demand]) -> None:
        body = {"t": time.time(), "m": {m: [*d.bands, d.queued] for m, d in demand.items()}}
        async with self.core.reachable():
            await self.core.redis.hset(redis_keys.ROUTER_DEMAND, instance, json.dumps(body))

    async def remove(self, instance: str) -> None:
        async with self.core.reachable():
            await self.core.redis.hdel(redis_keys.ROUTER_DEMAND, instance)

    async def all(self) -> dict[str, dict[str, Demand]]:
        """Every live router process's demand, per model (stale reports trimmed)."""
        async with self.core.reachable():
            raw = await self.core.redis.hgetall(redis_keys.ROUTER_DEMAND)
        now: float = time.time()
        out: dict[str, dict[str, Demand]] = {}
        stale: list[str] = []
        for instance, text in raw.items():
            instance, parsed = str(instance), _parse(str(text))
            if parsed is None or now - parsed[0] > STALE_S:
                stale.append(instance)
                continue
            out[instance] = parsed[1]
        if stale:
            async with self.core.reachable():
                await self.core.redis.hdel(redis_keys.ROUTER_DEMAND, *stale)
        return out


def totals(demand: Mapping[str, Mapping[str, Demand]]) -> dict[str, tuple[int, int]]:
    """Per model, over every router process: (in flight + waiting, waiting)."""
    out: dict[str, tuple[int, int]] = {}
    for per_model in demand.values():
        for model, d in per_model.items():
            total, queued = out.get(model, (0, 0))
            out[model] = (total + d.total, queued + d.queued)
    return out


def _parse(text: str) -> tuple[float, dict[str, Demand]] | None:
    try:
        body = json.loads(text)
        models = {}
        for model, numbers in body["m"].items():
            high, normal, low, queued = (max(0, int(str(n))) for n in _four(numbers))
            models[str(model)] = Demand((high, normal, low), queued)
        return float(body["t"]), models
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # not written by this version: left out, never a crash


def _four(numbers: Sequence[object]) -> Sequence[object]:
    if len(numbers) != 4:
        raise ValueError("four numbers expected")
    return numbers

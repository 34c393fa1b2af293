"""Flow control: requests wait in the router, not in the engines' FIFO, while every
replica of their model is at its concurrency target.

Each replica takes at most its target at once (`ModelSpec.concurrency_target`:
the catalog's `max_concurrency`, else the engine's `--max-num-seqs`, else the
`max_concurrency` setting). A request that finds no free slot waits in its
model's queue, and is sent the moment a slot frees:

- **Priority bands**: high before normal before low (the key's priority class;
  an open router's requests are normal). A band is served only when every
  higher one is empty.
- **A reserve for the higher bands**: while a higher band has asked in the last
  `priority_reserve_s`, a lower band leaves `priority_reserve` of the slots (at
  least one, never all) free for it, so that an interactive request finds a slot
  at once instead of waiting for a batch request to end. When the higher band is
  quiet, the lower ones use every slot.
- **Fair across keys** within a band: each key has its own FIFO and the band
  serves its keys round-robin, one request each, so a key sending ten times as
  many requests gets the same share of the slots as one that keeps a request
  waiting.
- **Bounded**: `queue_limit` requests per model per router process (over it the
  newest request of the lowest band waiting below the newcomer's is refused, or
  else the newcomer: 429 `queue_full`) and `queue_timeout_s` each (503
  `queue_timeout`), both with a `Retry-After` from the queue's depth and the
  measured time per request. A waiting stream gets SSE comments, as a held
  one does (`ondemand`).

Several router processes (workers and routers) share each model's slots: each
reports its demand per band once a second and takes its share by one pure rule
(`flow_share`), recomputing its own share at once when a band it did not ask in
gets a request. No Redis round trip on the request path; the cost is that a
share is up to a report old, so an engine may briefly get more than its target
(its own queue holds the excess, and the `num_requests_waiting` it reports lowers
the slots until that drains).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from nebula.models import Demand
from nebula.router import router_metrics
from nebula.router.flow_queue import BAND_OF, BANDS, ModelQueue, Ticket
from nebula.router.flow_share import share
from nebula.router.ondemand import Refused, keep_alive
from nebula.router.openai_errors import stream_error_event
from nebula.router.table import RoutingTable

# The mean time per request is an exponentially weighted average with this weight.
SERVICE_WEIGHT = 0.1
RETRY_AFTER_MAX_S = 60
IDLE = Demand((0, 0, 0), 0)


@dataclass(slots=True)
class Admitted:
    """A request let through: the stream opened while it waited (or None), and
    whether that stream already told the client it was refused."""

    band: int
    stream: web.StreamResponse | None = None
    answered: bool = False


class FlowControl:
    """The slots and queues of one router process (see the module's doc)."""

    def __init__(
        self,
        table: RoutingTable,
        *,
        default_target: int,
        queue_limit: int,
        queue_timeout_s: float,
        keepalive_s: float,
        reserve: float = 0.0,
        reserve_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.default_target = default_target
        self.queue_limit = queue_limit
        self.queue_timeout_s = queue_timeout_s
        self.keepalive_s = keepalive_s
        self.reserve = reserve  # of the slots, kept for higher bands while they ask
        self.reserve_s = reserve_s
        self.clock = clock
        self.last_seen: dict[str, list[float]] = {}  # model -> when each band last asked
        # model -> requests let through and not yet done, per band
        self.admitted: dict[str, list[int]] = {}
        self.shares: dict[str, int] = {}  # model -> this process's slots (flow_share)
        self.everyone: Mapping[str, Mapping[str, Demand]] = {}  # last read of all demand
        self.me = ""  # this process, as it reports itself
        self.engines_waiting: dict[str, int] = {}  # placement id -> its engine's queue
        self.queues: dict[str, ModelQueue] = {}
        self.service_s: dict[str, float] = {}  # model -> mean seconds a request holds a slot
        self._seq = itertools.count()
        table.listeners.append(self.poke)

    # The slots.

    def slots(self, model: str) -> int | None:
        """The model's slots in the whole cluster: its replicas' targets, less what
        their engines report waiting (a queue in an engine means they already have
        more than they take at once). None: no replica."""
        endpoints = self.table.endpoints(model)
        if not endpoints:
            return None
        total = sum(e.max_concurrency or self.default_target for e in endpoints)
        queued = sum(self.engines_waiting.get(e.placement_id, 0) for e in endpoints)
        return max(1, total - queued)

    def capacity(self, model: str) -> int | None:
        """Requests this process may have in flight to `model` now: its share of the
        slots (`flow_share`), or all of them before it knows of other processes.
        None: no replica (nothing to hold for: the request gets the usual answer)."""
        slots = self.slots(model)
        if slots is None:
            return None
        share = self.shares.get(model)
        return slots if share is None else min(share, slots)

    def _room(self, model: str, band: int) -> bool:
        """May a request of `band` take a slot of `model` now? A lower band leaves
        the reserve free while a higher band has been asking lately."""
        capacity = self.capacity(model)
        if capacity is None:
            return True
        if band and self.reserve and self._higher_active(model, band):
            capacity -= min(capacity - 1, max(1, round(self.reserve * capacity)))
        return sum(self.admitted.get(model, ())) < capacity

    def _higher_active(self, model: str, band: int) -> bool:
        seen = self.last_seen.get(model)
        if seen is None:
            return False
        since = self.clock() - self.reserve_s
        return any(at >= since for at in seen[:band])

    def _take(self, model: str, band: int) -> None:
        counts = self.admitted.setdefault(model, [0, 0, 0])
        counts[band] += 1

    def release(self, model: str, band: int, held_s: float | None) -> None:
        """A request let through is done (after `held_s`; None: not measured): its
        slot goes to the next in line."""
        counts = self.admitted.get(model)
        if counts is not None:
            counts[band] = max(0, counts[band] - 1)
            if not any(counts):
                del self.admitted[model]
        if held_s is not None:
            mean = self.service_s.get(model)
            self.service_s[model] = (
                held_s if mean is None else mean + SERVICE_WEIGHT * (held_s - mean)
            )
        self._dispatch(model)

    def demand(self) -> dict[str, Demand]:
        """What this process asks of each model: in flight plus waiting, per band."""
        out = {}
        for model in self.admitted.keys() | self.queues.keys():
            counts = self.admitted.get(model, [0, 0, 0])
            queue = self.queues.get(model)
            waiting = [queue.waiting(b) if queue else 0 for b in range(len(BANDS))]
            bands = (counts[0] + waiting[0], counts[1] + waiting[1], counts[2] + waiting[2])
            out[model] = Demand(bands, sum(waiting))
        return out

    def shared(self, everyone: Mapping[str, Mapping[str, Demand]], me: str) -> None:
        """Take this process's share of each model's slots, given every live router
        process's last reported demand (its own replaced by what it asks now)."""
        self.everyone, self.me = everyone, me
        models = set(self.admitted) | set(self.queues)
        for per_model in everyone.values():
            models.update(per_model)
        self.shares = {}
        for model in models:
            self._reshare(model)
        self.poke()

    def forget_others(self) -> None:
        """Without news of other processes (Redis away): all the slots, as if alone."""
        self.everyone, self.shares = {}, {}
        self.poke()

    def _reshare(self, model: str) -> None:
        """This process's share of `model`'s slots, with its demand as it is now (so a
        request in a higher band than the others' takes its slot at once; the others
        give theirs back at their next report)."""
        slots = self.slots(model)
        if slots is None or not self.me:
            return
        asked = {who: d.get(model, IDLE) for who, d in self.everyone.items()}
        asked[self.me] = self.demand().get(model, IDLE)
        self.shares[model] = share(slots, asked, self.me)

    def poke(self) -> None:
        """Replicas, their load or this process's shares changed: send what now fits."""
        for model in list(self.queues):
            self._dispatch(model)

    def _dispatch(self, model: str) -> None:
        queue = self.queues.get(model)
        while queue is not None and queue.depth and self._room(model, queue.next_band() or 0):
            ticket = queue.pop()
            assert ticket is not None
            self._take(model, ticket.band)
            ticket.granted.set_result(None)
        if queue is not None and not queue.depth:
            del self.queues[model]

    # The queue.

    def retry_after_s(self, model: str) -> float:
        """About how long the queue ahead takes to drain."""
        queue = self.queues.get(model)
        depth = queue.depth if queue is not None else 0
        slots = max(1, self.slots(model) or 1)
        seconds = (depth + 1) * self.service_s.get(model, 1.0) / slots
        return float(min(RETRY_AFTER_MAX_S, max(1, math.ceil(seconds))))

    async def enter(
        self,
        request: web.Request,
        model: str,
        key: str,
        priority: str,
        *,
        stream: bool,
        opened: web.StreamResponse | None = None,
    ) -> Admitted:
        """Take a slot for one request to `model`, waiting for one if none is free.
        Raises `Refused` (nothing sent yet) or returns the stream that said why."""
        band = BAND_OF.get(priority, BAND_OF["normal"])
        self.last_seen.setdefault(model, [-math.inf] * len(BANDS))[band] = self.clock()
        queue = self.queues.get(model)
        if (queue is None or not queue.depth) and self._room(model, band):
            self._take(model, band)
            return Admitted(band, opened)
        ticket = Ticket(key, band, next(self._seq), self.clock())
        self._make_room(model, ticket)
        queue = self.queues.setdefault(model, ModelQueue())
        queue.push(ticket)
        gauge = router_metrics.QUEUED.labels(model, BANDS[band])
        gauge.inc()
        if queue.waiting(band) == 1:  # a band this process did not ask in: ask now
            self._reshare(model)
            self._dispatch(model)
        try:
            return await self._wait(request, model, ticket, stream, opened)
        finally:
            gauge.dec()

    def _make_room(self, model: str, ticket: Ticket) -> None:
        """Refuse someone when the queue is full: the newest of a lower band, else
        the newcomer."""
        queue = self.queues.get(model)
        if queue is None or queue.depth < self.queue_limit:
            return
        retry = self.retry_after_s(model)
        victim = queue.newest_below(ticket.band)
        text = (
            f"{queue.depth} requests already wait for a free replica of model {model!r} here; "
            "retry later, or spread the load over time"
        )
        if victim is None:
            router_metrics.QUEUE_REFUSALS.labels(model, "queue_full").inc()
            raise Refused(429, text, "queue_full", retry)
        queue.remove(victim)
        router_metrics.QUEUE_REFUSALS.labels(model, "queue_full").inc()
        victim.refusal = Refused(
            429, text + " (a higher-priority request took this one's place)", "queue_full", retry
        )
        victim.granted.set_result(None)

    async def _wait(
        self,
        request: web.Request,
        model: str,
        ticket: Ticket,
        stream: bool,
        opened: web.StreamResponse | None,
    ) -> Admitted:
        response = opened
        deadline = ticket.queued_at + self.queue_timeout_s
        try:
            while not ticket.granted.done():
                left = deadline - self.clock()
                if left <= 0:
                    self._give_up(model, ticket)
                    router_metrics.QUEUE_REFUSALS.labels(model, "queue_timeout").inc()
                    text = f"no replica of model {model!r} was free for {self.queue_timeout_s:g}s"
                    retry = self.retry_after_s(model)
                    raise Refused(503, text + "; retry later", "queue_timeout", retry)
                step = min(left, self.keepalive_s) if stream else left
                await asyncio.wait((ticket.granted,), timeout=step)
                if stream and not ticket.granted.done() and self.clock() < deadline:
                    text = f"waiting for a free replica of {model}"
                    response = await keep_alive(request, response, text)
            if ticket.refusal is not None:
                raise ticket.refusal
        except Refused as refused:
            if response is None:
                raise
            await response.write(stream_error_event(refused.message, refused.code))
            await response.write_eof()
            return Admitted(ticket.band, response, answered=True)
        except BaseException:
            # The client left (cancelled) or the keep-alive write failed.
            self._give_up(model, ticket)
            raise
        waited = self.clock() - ticket.queued_at
        router_metrics.QUEUE_WAIT.labels(model, BANDS[ticket.band]).observe(waited)
        return Admitted(ticket.band, response)

    def _give_up(self, model: str, ticket: Ticket) -> None:
        """A waiting request leaves: out of the queue, or, if its slot was granted
        meanwhile, the slot goes to the next."""
        queue = self.queues.get(model)
        if queue is not None and queue.remove(ticket):
            if not queue.depth:
                del self.queues[model]
            return
        if ticket.granted.done() and ticket.refusal is None:
            self.release(model, ticket.band, None)

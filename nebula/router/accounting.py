"""Token budgets and usage accounting for one router process.

Usage (tokens per key, model and UTC day) is batched in memory and written
once per `usage_flush_s`. A key with a budget is different: what each answer
cost is added to the key's spend in Redis before the answer's last bytes reach
the client (`Account.settle`), and every request of that key first reads the
spend (`Ledger.admit`), so a key stops within one request of its budget
whichever router its requests go through. Requests in flight at the same time
can together pass the budget by what they cost: each was admitted before the
others' cost was known.

While Redis is away, each process admits on the last spend it read plus what it
spent since, and keeps its unsent spend (one number per budgeted key) to add
when Redis is back. Over-spending is then bounded by what the other router
processes spend of the budget during the outage: at most the budget left when
it began, once per process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from nebula.errors import NebulaError
from nebula.loops import every
from nebula.models import ApiKey
from nebula.router import router_metrics
from nebula.router.usage_tap import StreamTap, Tokens
from nebula.store import State
from nebula.tenancy import period_of

log = logging.getLogger(__name__)

OPEN = "open"  # the usage of an open router (no keys at all) is counted under this name
CHARS_PER_TOKEN = 4  # an answer cut short is charged its body's bytes / 4 as its prompt
REDIS_TIMEOUT_S = 0.5  # a budget check never holds a request longer
LOCAL_FOR_S = 5.0  # after a failure, budgets are checked locally this long


class BudgetExhausted(Exception):
    def __init__(self, key: ApiKey, spent: int, retry_after_s: float) -> None:
        super().__init__(
            f"the token budget of key {key.name!r} ({key.token_budget} tokens per "
            f"{key.budget_period}, UTC) is spent ({spent} used); it resets in "
            f"{retry_after_s / 3600:.1f} h"
        )
        self.retry_after_s = retry_after_s


class Ledger:
    def __init__(self, state: State, retention_days: int, flush_s: float) -> None:
        self.state = state
        self.retention_days = retention_days
        self.flush_s = flush_s
        self.pending: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        # (key, period) -> the spend last read from Redis; and what this process spent
        # that Redis has not been told yet (with the period's end).
        self.known: dict[tuple[str, str], int] = {}
        self.unsent: dict[tuple[str, str], tuple[int, float]] = {}
        self._local_until = 0.0
        self._day = ("", 0.0)  # the UTC day usage is counted under, and when it ends
        self._charging: set[asyncio.Task[None]] = set()

    def today(self, now: float) -> str:
        """The UTC day of `now`, worked out once a day, not per answer."""
        day, ends = self._day
        if now >= ends or not day:
            day, ends = period_of("day", now)
            self._day = (day, ends)
        return day

    async def admit(self, key: ApiKey) -> None:
        """Raise BudgetExhausted when `key` has spent its budget for this period."""
        if key.token_budget is None:
            return
        now = time.time()
        period, ends = period_of(key.budget_period, now)
        spent = await self._spent(key.name, period)
        if spent >= key.token_budget:
            router_metrics.BUDGET_REFUSALS.labels(key.name).inc()
            raise BudgetExhausted(key, spent, max(1.0, ends - now))

    async def _spent(self, name: str, period: str) -> int:
        unsent = self.unsent.get((name, period), (0, 0.0))[0]
        if time.monotonic() < self._local_until:
            return self.known.get((name, period), 0) + unsent
        try:
            value = await asyncio.wait_for(self.state.usage.spent(name, period), REDIS_TIMEOUT_S)
        except (NebulaError, TimeoutError) as exc:
            self._redis_failed(exc)
            return self.known.get((name, period), 0) + unsent
        self.known[(name, period)] = value
        return value + unsent

    def _redis_failed(self, exc: BaseException) -> None:
        if time.monotonic() >= self._local_until:
            log.warning(
                "token budgets: Redis unavailable (%s); checking them per process for now",
                type(exc).__name__,
            )
        self._local_until = time.monotonic() + LOCAL_FOR_S

    def account(self, key: ApiKey | None, model: str, *, strip: bool, body_bytes: int) -> Account:
        return Account(self, key, model, strip, body_bytes)

    def charge_later(self, key: ApiKey, tokens: int) -> None:
        """`charge` from a request that is being cancelled (it cannot wait for Redis)."""
        task = asyncio.get_running_loop().create_task(self.charge(key, tokens))
        self._charging.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._charging.discard)

    async def charge(self, key: ApiKey, tokens: int) -> None:
        """Add `tokens` to a budgeted key's spend in Redis, or keep them to send later."""
        now = time.time()
        period, ends = period_of(key.budget_period, now)
        at = (key.name, period)
        if time.monotonic() >= self._local_until:
            try:
                total = await asyncio.wait_for(
                    self.state.usage.charge(key.name, period, tokens, ends), REDIS_TIMEOUT_S
                )
                self.known[at] = total
                return
            except (NebulaError, TimeoutError) as exc:
                self._redis_failed(exc)
        self.unsent[at] = (self.unsent.get(at, (0, 0.0))[0] + tokens, ends)

    async def run(self) -> None:
        """Write the batched usage, and the spend kept while Redis was away, forever
        (a round that fails never ends it: usage would stop being counted)."""
        await every("recording token usage", self.flush_s, self.flush)

    async def flush(self) -> None:
        batch, self.pending = self.pending, defaultdict(lambda: [0, 0, 0])
        try:
            await self.state.usage.record(dict(batch), self.retention_days)
        except NebulaError as exc:
            log.warning("recording token usage failed (%s); retrying", exc.message)
            for where, counts in batch.items():  # kept for the next try
                mine = self.pending[where]
                for i, n in enumerate(counts):
                    mine[i] += n
            return
        for (name, period), (tokens, ends) in list(self.unsent.items()):
            try:
                total = await self.state.usage.charge(name, period, tokens, ends)
            except NebulaError:
                return  # Redis went away again: the rest waits for the next flush
            self.known[(name, period)] = total
            del self.unsent[(name, period)]


class Account:
    """One request's usage: read from its answer, then counted (and charged) once."""

    __slots__ = ("body_bytes", "key", "ledger", "model", "name", "sent", "settled", "strip")

    def __init__(
        self, ledger: Ledger, key: ApiKey | None, model: str, strip: bool, body_bytes: int
    ) -> None:
        self.ledger, self.key, self.model, self.strip = ledger, key, model, strip
        self.name = key.name if key is not None else OPEN
        self.body_bytes = body_bytes
        self.sent = False  # has an engine been sent the request (so done work for it)?
        self.settled = False

    def cut_short(self, events: int) -> None:
        """An answer that ended before its usage (the client left, the engine broke
        off): a budgeted key is charged an estimate, so that leaving a stream just
        before its end is no way around a budget. The prompt: the body's bytes / 4
        (an upper bound for most tokenizers); the answer: one token per event passed.
        Usage reports keep only what engines reported."""
        if self.settled:
            return
        self.settled = True
        key = self.key
        if key is None or key.token_budget is None or not self.sent:
            return
        estimate = self.body_bytes // CHARS_PER_TOKEN + events
        self.ledger.charge_later(key, estimate)

    def tap(self) -> StreamTap:
        return StreamTap(strip=self.strip)

    async def settle(self, tokens: Tokens | None) -> None:
        """Count the answer's tokens (once, whatever calls it again)."""
        if self.settled:
            return
        self.settled = True
        counts = self.ledger.pending[(self.ledger.today(time.time()), self.name, self.model)]
        counts[2] += 1
        if tokens is None:
            return
        counts[0] += tokens.prompt
        counts[1] += tokens.completion
        router_metrics.count_tokens(self.name, self.model, tokens.prompt, tokens.completion)
        if self.key is not None and self.key.token_budget is not None and tokens.total:
            await self.ledger.charge(self.key, tokens.total)

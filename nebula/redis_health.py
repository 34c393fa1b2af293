"""What each process knows of its Redis: which master it writes to (under Sentinel),
failovers it has seen, and how long it has been without a writable master.

A loop in every daemon (scheduler, agent, router) keeps these metrics and says
in its log what it is waiting for. It acts in one case: when Sentinel names a new
master, it resets the process's Redis connections (no command may go on to the
old master over a pooled connection) and bumps `State.master_epoch`, which the
grace rules read (docs/architecture.md); everything else they decide.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge

from nebula.loops import every
from nebula.store import State

log = logging.getLogger(__name__)

MASTER = Gauge(
    "nebula_redis_master",
    "1 for the Redis master this process follows (Sentinel deployments), 0 for earlier ones.",
    ["address"],
    multiprocess_mode="max",
)
FAILOVERS = Counter(
    "nebula_redis_failovers", "Changes of Redis master this process has seen (Sentinel)."
)
UNAVAILABLE = Gauge(
    "nebula_redis_unavailable_seconds",
    "Seconds this process has been without a writable Redis master (0 while it has one).",
    multiprocess_mode="max",
)

WARN_EVERY_S = 10.0


async def watch(state: State, interval_s: float) -> None:
    """Forever: follow the master Sentinel names, and time any outage."""
    known: str | None = None
    warned_at = 0.0

    async def check() -> None:
        nonlocal known, warned_at
        now = time.time()
        if state.connection.sentinel is not None:
            try:
                address = await state.connection.master_address()
            except Exception as exc:  # no Sentinel answers, or none knows a master
                address = None
                if now - warned_at > WARN_EVERY_S:
                    log.warning("waiting for Sentinel to name a Redis master (%s)", exc)
                    warned_at = now
            if address is not None and address != known:
                if known is None:
                    log.info("Redis master is %s (from Sentinel)", address)
                else:
                    FAILOVERS.inc()
                    MASTER.labels(known).set(0)
                    log.warning("Redis master changed: %s -> %s (failover)", known, address)
                    # No command may go on to the old master over a pooled connection.
                    try:
                        await state.connection.reset()
                    except Exception as exc:  # closing a dead connection may fail: fine
                        log.debug("resetting Redis connections: %s", exc)
                    state.master_epoch += 1
                MASTER.labels(address).set(1)
                known = address
        since = state.unavailable_since
        UNAVAILABLE.set(0.0 if since is None else now - since)
        if since is not None and now - since > WARN_EVERY_S and now - warned_at > WARN_EVERY_S:
            log.warning(
                "no writable Redis master for %.0fs; engines keep serving, waiting", now - since
            )
            warned_at = now

    await every("following the Redis master", interval_s, check)

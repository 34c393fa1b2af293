"""Prefix routing's index, shared: every router process sends the prefix keys it
newly routed, in batches, and learns every other's (store/prefixes.py).

Nothing on the request path waits for Redis: choices are recorded in memory and
sent by this task as soon as it runs (in one batch, however many came while it
was sending the last), and others' arrive through a blocking read. Until
another router's choice arrives (a write and a read: a millisecond or two),
this router agrees with it anyway for a new conversation under the load
bound (the rendezvous hash in `prefix.py`). While Redis is away, choices are
kept (bounded by `prefix.OUTBOX_LIMIT`) and sent when it is back; entries
written while a reader was away are read if still in the capped stream.
"""

from __future__ import annotations

import asyncio
import logging

from nebula.errors import NebulaError
from nebula.router import router_metrics
from nebula.router.prefix import OUTBOX_LIMIT, PrefixAffinity
from nebula.store import State
from nebula.store.prefixes import Learned

log = logging.getLogger(__name__)

READ_BLOCK_MS = 2000  # under the Redis client's 5 s socket timeout
WARM_ENTRIES = 5000  # a new process starts from the feed's last entries
RETRY_S = 1.0


def apply(prefix: PrefixAffinity, instance: str, learned: list[Learned]) -> int:
    """Learn other processes' entries, and the engines' evictions; the number of
    keys learned."""
    count = 0
    for entry in learned:
        pid = entry.placement_id
        if not pid:
            continue
        if entry.op == "evict":
            for session, fraction in entry.evicted.items():
                prefix.evicted(pid, session, fraction)
        elif entry.op == "clear":
            prefix.cleared(pid)
        elif entry.instance == instance:
            continue  # this process's own
        elif entry.op == "drop":
            prefix.learn_dropped(pid, entry.keys)
        elif entry.op == "":
            prefix.learn(pid, entry.keys)
            count += len(entry.keys)
    return count


async def send(state: State, prefix: PrefixAffinity, instance: str) -> None:
    """Send this process's new prefix keys as they come, forever."""
    ready = asyncio.Event()
    prefix.on_new = ready.set
    prefix.session_prefix = f"nebula:{instance}:"
    ready.set()  # what was recorded before this task ran
    while True:
        await ready.wait()
        ready.clear()
        box, dropped = prefix.take_outbox()
        if not box and not dropped:
            continue
        try:
            await state.prefix_feed.publish(instance, box, dropped)
            router_metrics.PREFIX_FEED.labels("sent").inc(sum(len(v) for v in box.values()))
            if dropped:
                dropped_keys = sum(len(v) for v in dropped.values())
                router_metrics.PREFIX_FEED.labels("dropped").inc(dropped_keys)
        except NebulaError as exc:
            log.debug("sharing prefix keys: %s", exc.message)
            for taken, kept in ((box, prefix.outbox), (dropped, prefix.dropped)):
                for pid, values in taken.items():  # keep them for the next try (bounded)
                    kept.setdefault(pid, [])[:0] = values[:OUTBOX_LIMIT]
            ready.set()
            await asyncio.sleep(RETRY_S)


async def learn(state: State, prefix: PrefixAffinity, instance: str) -> None:
    """Learn the other processes' choices, forever: the recent ones first."""
    last: str | None = None
    while True:
        try:
            if last is None:
                last, learned = await state.prefix_feed.recent(WARM_ENTRIES)
            else:
                last, learned = await state.prefix_feed.after(last, READ_BLOCK_MS)
            router_metrics.PREFIX_FEED.labels("learned").inc(apply(prefix, instance, learned))
            router_metrics.PREFIX_INDEX_KEYS.set(len(prefix.index))
        except NebulaError as exc:
            log.debug("reading the prefix feed: %s", exc.message)
            await asyncio.sleep(RETRY_S)
        except Exception:  # a bug must not stop the sharing for good: log, go on
            log.exception("reading the prefix feed failed; retrying")
            last = None  # start again from the feed's recent entries
            await asyncio.sleep(RETRY_S)


async def share(state: State, prefix: PrefixAffinity, instance: str) -> None:
    """Both directions, until cancelled."""
    await asyncio.gather(send(state, prefix, instance), learn(state, prefix, instance))

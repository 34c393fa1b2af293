"""Precise prefix routing, the node's half: follow what each engine's prefix cache
holds (vLLM's KV-cache events, `nebula.kv_events`) and tell the routers when
it drops a prompt they sent.

A router tags each request to an engine that publishes events with a
`session_id` of its own (`nebula:{router process}:{n}`); vLLM names that
session in the `BlockStored` events of the blocks the request computed (and of
those it found cached, where the request asks for a "full" report). The
mirror keeps, per block, the last session named with it and the block's
position in that session's prompt; when
the engine evicts a block, the session's prompt is cached no further than that
position, and the agent says so on the prefix feed (`evict`: placement,
session, the fraction of the prompt still cached). The router that owns the
session turns it into the prefix keys to forget, and shares that.

Events lost while nobody listens (the agent restarting, a full ZMQ queue)
are lost: the index then knows less precisely, as if it had no events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable, Iterable

import zmq
import zmq.asyncio

from nebula import kv_events
from nebula.agent import agent_metrics
from nebula.errors import NebulaError
from nebula.store import State

log = logging.getLogger(__name__)

SESSIONS_LIMIT = 100_000  # per engine: the prompts whose length the mirror remembers
WATCH_CHECK_S = 1.0
KINDS = {kv_events.Stored: "stored", kv_events.Removed: "removed", kv_events.Cleared: "cleared"}


class CacheMirror:
    """One engine's cached blocks: block hash -> (the last session named with it, its
    position in that session's prompt). Pure."""

    def __init__(self) -> None:
        self.blocks: dict[Hashable, tuple[str | None, int]] = {}
        self.lengths: dict[str, int] = {}  # session -> blocks of its prompt, oldest first

    def apply(self, events: Iterable[kv_events.Event]) -> tuple[dict[str, float], bool]:
        """Take events in; returns, for each session whose prompt lost a block, the
        fraction of it still cached, and whether the engine cleared everything."""
        lost: dict[str, int] = {}
        cleared = False
        for event in events:
            if isinstance(event, kv_events.Stored):
                self._stored(event)
            elif isinstance(event, kv_events.Removed):
                for block in event.hashes:
                    session, position = self.blocks.pop(block, (None, 0))
                    if session is not None:
                        lost[session] = min(lost.get(session, position), position)
            else:
                self.blocks.clear()
                self.lengths.clear()
                lost.clear()
                cleared = True
        fractions = {s: p / self.lengths[s] for s, p in lost.items() if self.lengths.get(s)}
        return fractions, cleared

    def _stored(self, event: kv_events.Stored) -> None:
        session = event.session
        if session is not None and not kv_events.is_router_session(session):
            session = None  # a client's own: no router asks, and it is not ours to keep
        if event.parent is None:
            start = 0
        elif event.parent in self.blocks:
            start = self.blocks[event.parent][1] + 1
        else:
            return  # a chain whose start this mirror never saw: its positions are unknown
        for i, block in enumerate(event.hashes):
            self.blocks[block] = (session, start + i)
        if session is not None:
            length = max(self.lengths.pop(session, 0), start + len(event.hashes))
            self.lengths[session] = length
            if len(self.lengths) > SESSIONS_LIMIT:
                del self.lengths[next(iter(self.lengths))]


async def watch(state: State, placement_id: str) -> None:
    """Follow one engine's events until cancelled."""
    socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, kv_events.TOPIC)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(kv_events.endpoint(placement_id))
    log.info("following the KV-cache events of %s", placement_id)
    mirror = CacheMirror()
    try:
        while True:
            events = kv_events.decode(await socket.recv_multipart())
            while await socket.poll(0):  # what queued meanwhile: one write for all
                events += kv_events.decode(await socket.recv_multipart())
            for event in events:
                agent_metrics.KV_EVENTS.labels(KINDS[type(event)]).inc()
            lost, cleared = mirror.apply(events)
            if not lost and not cleared:
                continue
            try:
                await state.prefix_feed.evicted(placement_id, lost, cleared)
            except NebulaError as exc:
                log.debug("reporting %s's evictions: %s", placement_id, exc.message)
    finally:
        socket.close()


async def watch_engines(state: State, engines: Callable[[], set[str]]) -> None:
    """One watcher per engine that `engines()` names (published, publishing events),
    started and stopped as that set changes."""
    watchers: dict[str, asyncio.Task[None]] = {}
    try:
        while True:
            wanted = engines()
            for pid, task in list(watchers.items()):
                if task.done():  # a bug, not the engine going away: log it, start again
                    if not task.cancelled() and task.exception() is not None:
                        log.error("following %s's KV events failed", pid, exc_info=task.exception())
                    del watchers[pid]
            for pid in wanted - watchers.keys():
                watchers[pid] = asyncio.create_task(watch(state, pid), name=f"kv-events-{pid}")
            for pid in watchers.keys() - wanted:
                watchers.pop(pid).cancel()
            await asyncio.sleep(WATCH_CHECK_S)
    finally:
        for task in watchers.values():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*watchers.values(), return_exceptions=True)

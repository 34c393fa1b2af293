"""The router's routing table: healthy endpoints per model, held in memory.

Refreshed from Redis on a change event and on a short timer, never per
request: one full read, then only the changes (`routing_read`): a poll of two
counters, the endpoint feed from the table's last sequence number when it
moved, the models and keys when their version moved. A gap in the feed (it
was trimmed past the table, or Redis came back with an older state) means a
full read. When Redis cannot be reached, the last table keeps serving: the
engines are still there, and a dead one is caught by the proxy's retry.

After an outage the first reads may find endpoints missing that are only
late: their keys lapsed while Redis was away (or were lost with it) and the
agents have not republished them yet. So for one endpoint TTL after an
outage the table merges (what it had, plus what it reads) instead of
replacing itself, and never goes blank because Redis came back. When that
window ends, the table reads everything again and keeps only what it reads:
an endpoint kept by the merge is checked again then (its engine may have died
during the outage, and its withdrawal may have been written before the merge).

An endpoint is routed to only when its URL's host is the address its node
registered with its heartbeat: whoever can write to Redis cannot point a
model's traffic, and the engine key sent with it, at a host outside the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from urllib.parse import urlsplit

from nebula import redis_keys
from nebula.errors import StateUnavailable
from nebula.loops import reconcile_forever
from nebula.models import ApiKey, Endpoint
from nebula.router import routing_read
from nebula.router.routing_read import Config
from nebula.store import State, endpoints, wire

# Feed entries read per refresh at most; more behind than that: a full read.
MAX_CHANGES = 5000

log = logging.getLogger(__name__)

REFUSED_LOGGED = 1000


def host_of(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


class RoutingTable:
    def __init__(self, merge_after_outage_s: float = 8.0) -> None:
        self.healthy: dict[str, list[Endpoint]] = {}  # model -> its routable endpoints
        self.loaded: set[str] = set()  # models loaded (requested), healthy or not
        self.unloading: set[str] = set()  # models being unloaded
        self.api_keys: dict[str, ApiKey] = {}  # digest -> key
        self.refreshed_at = 0.0
        self.fresh = False  # False until the first read, and while Redis is away
        self.merge_after_outage_s = merge_after_outage_s
        self._merge_until = 0.0
        self._merged: set[str] = set()  # placement ids kept by the merge, not read
        self._ever_read = False
        self._epoch = 0  # the state store's master epoch of the last read
        self.listeners: list[Callable[[], None]] = []  # told after every load
        self.by_id: dict[str, Endpoint] = {}
        self.seq: int | None = None  # the endpoint feed's position; None: read it all
        self.version: int | None = None  # the routing version of models and keys
        self.full_reads = 0
        # node id -> the address its heartbeat registered: an endpoint is routed to
        # only at its node's address (see `_routable`). Kept over outages.
        self.addresses: dict[str, str] = {}
        self._refused: set[str] = set()  # endpoints logged as refused (bounded below)

    def endpoints(self, model: str) -> list[Endpoint]:
        return self.healthy.get(model, [])

    def healthy_models(self) -> list[str]:
        """The models with a routable endpoint now (`loaded` may have none)."""
        return sorted(self.healthy)

    def load(
        self,
        endpoints: list[Endpoint],
        models: set[str],
        api_keys: list[ApiKey],
        unloading: set[str] | None = None,
    ) -> None:
        now = time.time()
        if now < self._merge_until:
            # Just after an outage: keep what agents have not republished yet, except
            # for models no longer loaded at all.
            seen = {e.placement_id for e in endpoints}
            kept = [
                e
                for model in models - (unloading or set())
                for e in self.healthy.get(model, [])
                if e.placement_id not in seen
            ]
            self._merged = {e.placement_id for e in kept}
            endpoints = endpoints + kept
        else:
            self._merged = set()
        self.by_id = {e.placement_id: e for e in endpoints}
        self.configure(Config(self.version or 0, models, api_keys, unloading or set()))
        self._rebuild(now)

    def configure(self, config: Config) -> None:
        self.loaded = set(config.models)
        self.unloading = set(config.unloading)
        self.api_keys = {k.digest: k for k in config.api_keys}

    def apply(self, changes: list[tuple[int, str, str, str]]) -> None:
        """Feed entries, in order: endpoints up (added or replaced) and down."""
        for _, op, placement_id, raw in changes:
            if op != "up":
                self.by_id.pop(placement_id, None)
                continue
            try:
                self.by_id[placement_id] = endpoints.decode(raw)
            except wire.UNREADABLE as exc:
                # Not routable: one that cannot be read is left out, never a stop.
                wire.skipped("endpoint", placement_id, exc)
                self.by_id.pop(placement_id, None)
        self._rebuild(time.time())

    def _routable(self, endpoint: Endpoint) -> bool:
        """Only at the address its node registered: whoever can write an endpoint to
        Redis cannot send a model's traffic (and the engine key) to another host."""
        return host_of(endpoint.url) == self.addresses.get(endpoint.node)

    async def learn_addresses(self, state: State) -> None:
        """Read the registered address of each node whose endpoints do not match the
        one known (a new node, a changed address); rebuild if any changed, and say
        which endpoints are still not routed to."""
        needed = {e.node for e in self.by_id.values() if not self._routable(e)}
        if not needed:
            return
        found = await state.nodes.addresses(needed)
        changed = {n: a for n, a in found.items() if self.addresses.get(n) != a}
        if changed:
            self.addresses.update(changed)
            self._rebuild(time.time())
        for endpoint in self.by_id.values():
            if not self._routable(endpoint):
                self._refuse(endpoint)

    def _refuse(self, endpoint: Endpoint) -> None:
        if endpoint.placement_id in self._refused or len(self._refused) >= REFUSED_LOGGED:
            return
        self._refused.add(endpoint.placement_id)
        log.warning(
            "not routing to endpoint %s of %s: its URL's host is not the address node %s "
            "registered (%s)",
            endpoint.placement_id,
            endpoint.model,
            endpoint.node,
            self.addresses.get(endpoint.node, "none"),
        )

    def _rebuild(self, now: float) -> None:
        by_model: dict[str, list[Endpoint]] = defaultdict(list)
        for pid in sorted(self.by_id):
            endpoint = self.by_id[pid]
            if self._routable(endpoint):
                by_model[endpoint.model].append(endpoint)
        self.healthy = dict(by_model)
        self.loaded |= set(by_model)
        self.refreshed_at = now
        self.fresh = True
        self._ever_read = True
        for listener in self.listeners:
            listener()

    def age(self) -> float:
        return time.time() - self.refreshed_at if self._ever_read else float("inf")

    async def refresh(self, state: State) -> None:
        try:
            await self._refresh(state)
        except StateUnavailable as exc:
            if self.fresh:
                log.warning("%s; routing from the last table", exc.message)
            if self._ever_read:
                self._merge_until = float("inf")  # until the first read after the outage
            self.fresh = False
            self.seq = None  # Redis may come back with another state: read it all

    async def _refresh(self, state: State) -> None:
        if self._epoch != state.master_epoch:
            # A new master (failover): endpoints written on the old one in its last
            # moments may be missing here until their agents announce them again.
            self._epoch = state.master_epoch
            self._merge_until = float("inf")
            self.seq = None
        if self._merged and time.time() >= self._merge_until:
            # The merge window is over: read it all, and keep only what is there.
            log.info("re-checking %d endpoint(s) kept over an outage", len(self._merged))
            self.seq = None
        if self.seq is not None:
            seq, version = await routing_read.poll(state)
            reconfigured = version != self.version
            if reconfigured:
                self.configure(await routing_read.read_config(state))
                self.version = version
            if seq == self.seq:
                if reconfigured:
                    self._rebuild(time.time())
                else:
                    self._touch()
                return
            if self.seq < seq <= self.seq + MAX_CHANGES:
                changes = await state.endpoints.changes_after(self.seq, seq - self.seq)
                if changes and changes[0][0] == self.seq + 1 and changes[-1][0] >= seq:
                    self.apply(changes)
                    self.seq = changes[-1][0]
                    await self.learn_addresses(state)
                    return
            log.info(
                "endpoint feed: a gap after %d (now %d); reading the whole table", self.seq, seq
            )
        full = await routing_read.read_full(state)
        self.full_reads += 1
        if self._merge_until == float("inf"):
            self._merge_until = time.time() + self.merge_after_outage_s
            log.info(
                "state store back; merging the routing table for %.1fs", self.merge_after_outage_s
            )
        self.version = full.config.version
        c = full.config
        self.load(full.endpoints, c.models, c.api_keys, c.unloading)
        self.seq = full.seq
        await self.learn_addresses(state)

    def _touch(self) -> None:
        self.refreshed_at = time.time()
        self.fresh = True

    async def keep_fresh(self, state: State, interval_s: float) -> None:
        """Refresh on every change event, and every `interval_s` regardless."""
        # Never dies of an error: /health reports the table's age, and a refresher
        # that stopped would freeze it. (`refresh` handles Redis being away itself.)
        await reconcile_forever(
            "routing table refresh",
            lambda: self.refresh(state),
            wake=asyncio.Event(),
            interval=lambda: interval_s,
            on_error=lambda exc: log.warning("routing table refresh: %s", exc.message),
            listen=(state, redis_keys.EVENTS_CHANNEL),
        )

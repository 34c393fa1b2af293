"""The router's routing table: healthy endpoints per model, held in memory.

Refreshed from Redis on a change event and on a short timer, never per
request. When Redis cannot be reached, the last table keeps serving: the
engines are still there, and a dead one is caught by the proxy's retry.

After an outage the first reads may find endpoints missing that are only
late: their keys lapsed while Redis was away (or were lost with it) and the
agents have not republished them yet. So for one endpoint TTL after an
outage the table merges (what it had, plus what it reads) instead of
replacing itself, and never goes blank because Redis came back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

from nebula import keys
from nebula.errors import StateUnavailable
from nebula.loops import reconcile_forever
from nebula.models import ApiKey, Endpoint
from nebula.settings import redact
from nebula.store import State, api_keys

log = logging.getLogger(__name__)


class Routing(NamedTuple):
    endpoints: list[Endpoint]
    models: set[str]  # loaded (requested) models
    api_keys: list[ApiKey]
    unloading: set[str]  # models being unloaded


async def read_routing(state: State) -> Routing:
    """What a router needs, in two round trips."""
    async with state.reachable(), state.redis.pipeline(transaction=False) as pipe:
        state.endpoints.stage_read_live_ids(pipe)
        state.requests.stage_read_routing(pipe)
        state.api_keys.stage_read_all(pipe)
        # A replica (a master demoted by a failover, or a misconfiguration) still
        # answers reads, but nobody can refresh what it holds: its endpoints lapse
        # one by one. That is an outage, not a dying cluster.
        pipe.execute_command("ROLE")
        ids, models, unloading, keys_raw, role = await pipe.execute()
    if role and role[0] != "master":
        raise StateUnavailable(
            f"Redis at {redact(state.url)} is a {role[0]} (read-only): no writer can "
            "refresh the routing state"
        )
    endpoints = await state.endpoints.read(ids)
    return Routing(endpoints, set(models), [api_keys.decode(k) for k in keys_raw], set(unloading))


class RoutingTable:
    def __init__(self, merge_after_outage_s: float = 8.0) -> None:
        self.by_model: dict[str, list[Endpoint]] = {}
        self.models: set[str] = set()  # loaded (requested) models, healthy or not
        self.unloading: set[str] = set()  # models being unloaded
        self.api_keys: dict[str, ApiKey] = {}  # digest -> key
        self.refreshed_at = 0.0
        self.fresh = False  # False until the first read, and while Redis is away
        self.merge_after_outage_s = merge_after_outage_s
        self._merge_until = 0.0
        self._ever_read = False
        self._epoch = 0  # the state store's master epoch of the last read
        self.listeners: list[Callable[[], None]] = []  # told after every load

    def endpoints(self, model: str) -> list[Endpoint]:
        return self.by_model.get(model, [])

    def served(self) -> list[str]:
        return sorted(self.by_model)

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
            endpoints = endpoints + [
                e
                for model in models - (unloading or set())
                for e in self.by_model.get(model, [])
                if e.placement_id not in seen
            ]
        by_model: dict[str, list[Endpoint]] = defaultdict(list)
        for endpoint in sorted(endpoints, key=lambda e: e.placement_id):
            by_model[endpoint.model].append(endpoint)
        self.by_model = dict(by_model)
        self.models = models | set(by_model)
        self.unloading = unloading or set()
        self.api_keys = {k.digest: k for k in api_keys}
        self.refreshed_at = now
        self.fresh = True
        self._ever_read = True
        for listener in self.listeners:
            listener()

    def age(self) -> float:
        return time.time() - self.refreshed_at if self._ever_read else float("inf")

    async def refresh(self, state: State) -> None:
        try:
            read = await read_routing(state)
        except StateUnavailable as exc:
            if self.fresh:
                log.warning("%s; routing from the last table", exc.message)
            if self._ever_read:
                self._merge_until = float("inf")  # until the first read after the outage
            self.fresh = False
            return
        if self._epoch != state.master_epoch:
            # A new master (failover): endpoints refreshed on the old one in its last
            # moments may be missing here until their agents announce them again.
            self._epoch = state.master_epoch
            self._merge_until = float("inf")
        if self._merge_until == float("inf"):
            self._merge_until = time.time() + self.merge_after_outage_s
            log.info("state store back; merging the routing table for %.1fs",
                     self.merge_after_outage_s)  # fmt: skip
        self.load(*read)

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
            listen=(state, keys.EVENTS_CHANNEL),
        )

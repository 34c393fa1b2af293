"""The router's routing table: healthy endpoints per model, held in memory.

Refreshed from Redis on a change event and on a short timer, never per
request. When Redis cannot be reached, the last table keeps serving: the
engines are still there, and a dead one is caught by the proxy's retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from nebula import keys
from nebula.errors import StateUnavailable
from nebula.models import ApiKey, Endpoint
from nebula.state import State

log = logging.getLogger(__name__)


class RoutingTable:
    def __init__(self) -> None:
        self.by_model: dict[str, list[Endpoint]] = {}
        self.models: set[str] = set()  # loaded (requested) models, healthy or not
        self.api_keys: dict[str, ApiKey] = {}  # digest -> key
        self.refreshed_at = 0.0
        self.fresh = False  # False until the first read, and while Redis is away

    def endpoints(self, model: str) -> list[Endpoint]:
        return self.by_model.get(model, [])

    def served(self) -> list[str]:
        return sorted(self.by_model)

    def load(self, endpoints: list[Endpoint], models: set[str], api_keys: list[ApiKey]) -> None:
        by_model: dict[str, list[Endpoint]] = defaultdict(list)
        for endpoint in sorted(endpoints, key=lambda e: e.placement_id):
            by_model[endpoint.model].append(endpoint)
        self.by_model = dict(by_model)
        self.models = models | set(by_model)
        self.api_keys = {k.digest: k for k in api_keys}
        self.refreshed_at = time.time()
        self.fresh = True

    async def refresh(self, state: State) -> None:
        try:
            self.load(*await state.routing())
        except StateUnavailable as exc:
            if self.fresh:
                log.warning("%s; routing from the last table", exc.message)
            self.fresh = False

    async def keep_fresh(self, state: State, interval_s: float) -> None:
        """Refresh on every change event, and every `interval_s` regardless."""
        wake = asyncio.Event()

        listener = asyncio.create_task(
            state.wake_on(wake, keys.EVENTS_CHANNEL, interval_s), name="routing-events"
        )
        try:
            while True:
                wake.clear()
                await self.refresh(state)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), interval_s)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

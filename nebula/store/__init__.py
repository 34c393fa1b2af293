"""Nebula's state in Redis: a connection core and one store per aggregate.

    core.Core            the connection, the error mapping, pub/sub wake-ups
    requests.Requests    model requests, their events, the model -> request map
    nodes.Nodes          heartbeats, cordon and drain marks
    placements.Placements  desired placements and their observed states
    endpoints.Endpoints  healthy engines for the routers
    inflight.RouterInFlight  what routers have in flight to each engine (drains)
    demand.RouterDemand  what routers ask of each model (flow control, autoscaling)
    api_keys.ApiKeys     hashed client keys and their scopes
    usage.Usage          tokens per key, model and day; budgeted keys' spend
    prefixes.PrefixFeed  prefix routing's shared index (routers' choices)
    engine_load.EngineLoads  what engines report of their load (routing)
    targets.MetricsTargets  /metrics addresses for Prometheus
    lease.Lease          the scheduler's leader lease

Each store owns its keys (spelled in `nebula.redis_keys`) and its wire format
(`wire` holds the shared rules: a version, unknown fields ignored). Writes
that must be atomic across aggregates are staged by each store onto one
shared pipeline (the scheduler's pass, `scheduler/store.py`).
"""

from __future__ import annotations

from nebula.settings import Settings
from nebula.store.api_keys import ApiKeys
from nebula.store.core import Core
from nebula.store.demand import RouterDemand
from nebula.store.endpoints import Endpoints
from nebula.store.engine_load import EngineLoads
from nebula.store.inflight import RouterInFlight
from nebula.store.lease import Lease
from nebula.store.nodes import Nodes
from nebula.store.placements import Placements
from nebula.store.prefixes import PrefixFeed
from nebula.store.requests import Requests
from nebula.store.targets import MetricsTargets
from nebula.store.usage import Usage


class State(Core):
    """The connection core, with every store on it."""

    def __init__(
        self,
        url: str,
        *,
        event_history: int = 100,
        sentinel_password: str = "",
        tls_ca_file: str | None = None,
    ) -> None:
        super().__init__(url, sentinel_password=sentinel_password, tls_ca_file=tls_ca_file)
        self.requests = Requests(self, event_history)
        self.nodes = Nodes(self)
        self.placements = Placements(self)
        self.endpoints = Endpoints(self)
        self.in_flight = RouterInFlight(self)
        self.demand = RouterDemand(self)
        self.api_keys = ApiKeys(self)
        self.usage = Usage(self)
        self.prefix_feed = PrefixFeed(self)
        self.engine_load = EngineLoads(self)
        self.targets = MetricsTargets(self)
        self.lease = Lease(self)

    @classmethod
    def of(cls, settings: Settings) -> State:
        """The state store `settings` name (a plain Redis or a Sentinel-watched master)."""
        return cls(
            settings.redis_url,
            event_history=settings.event_history,
            sentinel_password=settings.redis_sentinel_password,
            tls_ca_file=str(settings.redis_tls_ca_file) if settings.redis_tls_ca_file else None,
        )

    async def __aenter__(self) -> State:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["State"]

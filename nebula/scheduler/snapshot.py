"""What the scheduler reads in a pass and what it writes back: plain data, no I/O,
so `reconcile` and `placement` are tested without Redis."""

from __future__ import annotations

from dataclasses import dataclass, field

from nebula.models import Device, ModelRequest, Node, Placement, PlacementState, Status


@dataclass
class Snapshot:
    """Everything the scheduler reads in one pass."""

    node_ids: set[str] = field(default_factory=set)  # registered, alive or not
    alive: set[str] = field(default_factory=set)  # heartbeat key present
    nodes: dict[str, Node] = field(default_factory=dict)  # last telemetry read, alive only
    requests: dict[str, ModelRequest] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)  # id -> placement
    states: dict[str, PlacementState] = field(default_factory=dict)  # placement id -> state
    marks: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())  # cordoned, draining
    devices_cache: dict[str, tuple[Device, ...]] = field(default_factory=dict)  # raw -> parsed
    state_ids: dict[str, set[str]] = field(default_factory=dict)  # node -> ids in its states
    # What others changed since the previous pass (everything, on a full pass).
    dirty_requests: set[str] = field(default_factory=set)
    dirty_nodes: set[str] = field(default_factory=set)  # nodes whose placement states changed
    # When each model was last used (routers' batches); read about once a second, and
    # only a pass that read it decides idle unloads and evictions.
    last_used: dict[str, float] = field(default_factory=dict)
    last_used_fresh: bool = False
    # Pending requests waiting for evicted models to unload -> why (kept between the
    # passes that decide evictions, so their message stays put).
    making_room: dict[str, str] = field(default_factory=dict)
    # Requests whose stored value could not be read (a newer writer's, or damaged):
    # neither they nor their replicas are touched until they can be read again.
    unreadable_requests: set[str] = field(default_factory=set)


@dataclass
class Changes:
    """The scheduler's writes for one pass, applied atomically."""

    put_placements: list[Placement] = field(default_factory=list)
    drop_placements: list[Placement] = field(default_factory=list)
    put_requests: list[ModelRequest] = field(default_factory=list)
    gone_requests: list[ModelRequest] = field(default_factory=list)
    events: list[tuple[str, str, Status]] = field(default_factory=list)  # request, text, status
    dead_nodes: list[str] = field(default_factory=list)
    scaled: list[ModelRequest] = field(default_factory=list)  # autoscaling's new replicas
    # Not written, for metrics: models unloaded for idling; (evicted, for whom).
    idle_unloaded: list[str] = field(default_factory=list)
    evicted: list[tuple[str, str]] = field(default_factory=list)
    # Not written: what could not be placed this pass (request id -> reasons), for metrics.
    pending: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(
            (
                self.put_placements,
                self.drop_placements,
                self.put_requests,
                self.gone_requests,
                self.events,
                self.dead_nodes,
                self.scaled,
            )
        )

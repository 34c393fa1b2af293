"""A node's side of the protocol, played by the test over real Redis.

The scheduler's tests need nodes that heartbeat and report engine phases
without starting engines; the node agent's own tests use the real agent.
"""

from __future__ import annotations

import time
from dataclasses import replace

from nebula.models import Desired, Node, Phase, Placement, PlacementState, Status
from nebula.store import State


class NodeSim:
    def __init__(self, state: State, node: Node, ttl_s: float = 1.0) -> None:
        self.state = state
        self.node = node
        self.ttl_s = ttl_s

    async def beat(self) -> None:
        self.node = replace(self.node, heartbeat_at=time.time())
        await self.state.nodes.heartbeat(self.node, self.ttl_s)

    async def placements(self) -> list[Placement]:
        return sorted(await self.state.placements.of_node(self.node.id), key=lambda p: p.id)

    async def report(self, placement_id: str, phase: Phase, message: str = "") -> None:
        await self.state.placements.report(
            self.node.id,
            {placement_id: PlacementState(phase=phase, message=message, updated_at=time.time())},
        )

    async def converge(self, phase: Phase = Phase.HEALTHY) -> None:
        """Report every wanted engine in `phase` and every unwanted one Stopped."""
        for p in await self.placements():
            await self.report(p.id, phase if p.desired is Desired.RUN else Phase.STOPPED)


async def status_of(state: State, ref: str) -> tuple[Status, str]:
    """A model request's status and message, as the scheduler last wrote them."""
    request = await state.requests.get(ref)
    return request.status, request.message

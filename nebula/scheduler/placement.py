"""The placement function: pure, no I/O. Nodes, requests and current placements in;
new placements and the reasons for what could not be placed out.

Rules (docs/architecture.md has the why):

- Current placements are never moved; their memory is taken first.
- A GPU offers `min(ceiling - fractions placed on it, telemetry free fraction -
  fractions of placements whose engine is not yet confirmed running)`. The second
  term respects memory held by processes Nebula does not manage, without
  counting an engine that is already running twice. A CPU node (no GPUs) offers
  its RAM the same way, in GiB.
- A replica with tensor-parallel size t needs t GPUs of one node, each with its
  fraction free.
- Replicas of one request spread across nodes first (a node that holds none of
  them is preferred), then across GPUs within a node.
- Among the nodes that fit, the tightest one wins (best fit), which keeps whole
  GPUs free for large models.
- Requests are served oldest first; a replica that fits nowhere is reported
  `Pending` with the reason, and is placed on a later pass once room appears.
- Ports come from the node's range; the lowest free one is taken.

At scale (thousands of nodes) a linear scan per replica is too slow, so free
capacity is indexed in buckets: for each tensor-parallel size t, a node sits in
the bucket of its t-th largest GPU offer. Finding the tightest node that fits is
a walk up the non-empty buckets from the one the request needs.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from nebula.models import ModelRequest, Node, Placement, Status
from nebula.scheduler.buckets import Buckets
from nebula.scheduler.usage import Usage

EPS = 1e-9
GPU_BUCKETS_PER_UNIT = 1000  # GPU offers are fractions of 1: buckets 0.001 wide
CPU_BUCKETS_PER_GIB = 16  # CPU offers are GiB: buckets 64 MiB wide
MIB_PER_GIB = 1024

PLACEABLE = frozenset(
    {Status.PENDING, Status.SCHEDULED, Status.LOADING, Status.READY, Status.DEGRADED}
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the placement function decided."""

    new: tuple[Placement, ...]
    # request id -> one reason per replica that could not be placed
    pending: dict[str, tuple[str, ...]] = field(default_factory=dict)


def default_id() -> str:
    return uuid.uuid4().hex[:12]


class _NodeRoom:
    """Mutable free capacity and ports of one node during a pass."""

    __slots__ = (
        "_next_port",
        "_own_ports",
        "gpu_free",
        "idx",
        "node",
        "ports",
        "ram_free",
    )

    def __init__(self, idx: int, node: Node) -> None:
        self.idx = idx
        self.node = node
        self.gpu_free: list[float] = []
        self.ram_free = 0.0
        self.ports: set[int] = set()
        self._own_ports = False
        self._next_port = node.port_min

    def has_port(self) -> bool:
        # Ports are only taken during a pass, so the lowest free one never moves down.
        while self._next_port in self.ports:
            self._next_port += 1
        return self._next_port <= self.node.port_max

    def take_port(self) -> int:
        if not self.has_port():
            raise RuntimeError(f"node {self.node.id} has no free port")  # callers check first
        port = self._next_port
        if not self._own_ports:  # the set is the Usage's until this pass takes a port
            self.ports = set(self.ports)
            self._own_ports = True
        self.ports.add(port)
        self._next_port += 1
        return port

    def kth_gpu_offer(self, k: int) -> float:
        """The k-th largest GPU offer on this node (k from 1), or -1 if it has fewer GPUs."""
        if k > len(self.gpu_free):
            return -1.0
        if k == 1:
            return max(self.gpu_free)
        return sorted(self.gpu_free, reverse=True)[k - 1]


def _gpu_key(offer: float) -> int:
    return int(offer * GPU_BUCKETS_PER_UNIT + EPS)


def _cpu_key(offer: float) -> int:
    return int(offer * CPU_BUCKETS_PER_GIB + EPS)


class _Cluster:
    """The free-capacity index over all schedulable nodes."""

    def __init__(
        self,
        nodes: Sequence[Node],
        usage: Usage,
        ceiling: float,
        todo: Sequence[ModelRequest],
    ) -> None:
        self.rooms = [_NodeRoom(i, node) for i, node in enumerate(nodes)]
        self.usage = usage
        zero = (0.0, 0.0)
        gpu = usage.gpu
        for room in self.rooms:
            node = room.node
            # Two budgets per GPU (and per CPU node's RAM): what the ceiling allows, and
            # what telemetry says is free less what unconfirmed engines will still take.
            # (A plain loop: this runs for every GPU of the cluster on every pass.)
            if node.devices:
                free = []
                node_id = node.id
                for d in node.devices:
                    sums = gpu.get((node_id, d.index))
                    real = d.free_fraction
                    free.append(
                        min(ceiling - sums[0], real - sums[1]) if sums else min(ceiling, real)
                    )
                room.gpu_free = free
            else:
                placed, unconfirmed = usage.ram.get(node.id, zero)
                room.ram_free = min(
                    node.ram_total_mib / MIB_PER_GIB * ceiling - placed,
                    node.ram_available_mib / MIB_PER_GIB - unconfirmed,
                )
            room.ports = usage.ports.get(node.id, set())  # copied before the first port taken
        draining = {node.id: node.draining for node in nodes}
        self.holders: dict[tuple[int, str], int] = defaultdict(int)  # (node idx, request) -> n
        index = {room.node.id: room.idx for room in self.rooms}
        for r in todo:
            for node_id, n in usage.run.get(r.id, {}).items():
                if n and draining.get(node_id) is False:
                    self.holders[index[node_id], r.id] += n
        self.new_gpu_holders: set[tuple[int, int, str]] = set()  # placed during this pass
        self.tp_sizes = sorted({r.spec.tensor_parallel_size for r in todo})
        self.gpu_index: dict[int, Buckets] = {t: Buckets() for t in self.tp_sizes}
        self.gpu_keys: dict[tuple[int, int], int] = {}
        self.cpu_index = Buckets()
        self.cpu_keys: dict[int, int] = {}
        self.cordoned = 0
        for room in self.rooms:
            if room.node.cordoned:
                self.cordoned += 1
                continue
            self._file(room)

    def holds_gpu(self, room: _NodeRoom, pos: int, request_id: str) -> bool:
        index = room.node.devices[pos].index
        return (
            self.usage.gpu_holders.get((room.node.id, index, request_id), 0) > 0
            or (room.idx, pos, request_id) in self.new_gpu_holders
        )

    def _file(self, room: _NodeRoom) -> None:
        if room.node.devices:
            for t in self.tp_sizes:
                offer = room.kth_gpu_offer(t)
                if offer > EPS:
                    key = _gpu_key(offer)
                    self.gpu_keys[room.idx, t] = key
                    self.gpu_index[t].add(key, room.idx)
        elif room.ram_free > EPS:
            key = _cpu_key(room.ram_free)
            self.cpu_keys[room.idx] = key
            self.cpu_index.add(key, room.idx)

    def _unfile(self, room: _NodeRoom) -> None:
        for t in self.tp_sizes:
            key = self.gpu_keys.pop((room.idx, t), None)
            if key is not None:
                self.gpu_index[t].remove(key, room.idx)
        key = self.cpu_keys.pop(room.idx, None)
        if key is not None:
            self.cpu_index.remove(key, room.idx)

    def _candidates(self, buckets: Buckets, key: int, request_id: str) -> Iterator[_NodeRoom]:
        """Rooms from `key` up, tightest first; fewer replicas of the request held first."""
        held: list[tuple[int, _NodeRoom]] = []
        for idx in buckets.from_key(key):
            room = self.rooms[idx]
            count = self.holders.get((idx, request_id), 0)
            if count:
                held.append((count, room))
            else:
                yield room
        held.sort(key=lambda item: item[0])  # stable: tightest first within a count
        yield from (room for _, room in held)

    def place_gpu(
        self, request_id: str, fraction: float, tp: int
    ) -> tuple[_NodeRoom, tuple[int, ...]] | None:
        for room in self._candidates(self.gpu_index[tp], _gpu_key(fraction), request_id):
            if not room.has_port():
                continue
            fits = [i for i, free in enumerate(room.gpu_free) if free + EPS >= fraction]
            if len(fits) < tp:
                continue
            # Across GPUs: those without a replica of this request first, then tightest fit.
            fits.sort(key=lambda i: (self.holds_gpu(room, i, request_id), room.gpu_free[i]))
            chosen = sorted(fits[:tp])
            self._unfile(room)
            for i in chosen:
                room.gpu_free[i] -= fraction
                self.new_gpu_holders.add((room.idx, i, request_id))
            self._file(room)
            self.holders[room.idx, request_id] += 1
            return room, tuple(room.node.devices[i].index for i in chosen)
        return None

    def place_cpu(self, request_id: str, gib: float) -> _NodeRoom | None:
        for room in self._candidates(self.cpu_index, _cpu_key(gib), request_id):
            if not room.has_port() or room.ram_free + EPS < gib:
                continue
            self._unfile(room)
            room.ram_free -= gib
            self._file(room)
            self.holders[room.idx, request_id] += 1
            return room
        return None


def _why_unplaced(request: ModelRequest, cordoned: int, live: int) -> str:
    spec = request.spec
    parts = []
    if spec.gpu_memory_utilization is not None:
        tp = spec.tensor_parallel_size
        frac = spec.gpu_memory_utilization
        if tp == 1:
            parts.append(f"no GPU with {frac:.2f} free")
        else:
            parts.append(f"no node with {tp} GPUs with {frac:.2f} free each")
    if spec.cpu_memory_gib is not None and spec.tensor_parallel_size == 1:
        parts.append(f"no CPU node with {spec.cpu_memory_gib:g} GiB RAM free")
    reason = " and ".join(parts)
    if live == 0:
        return "no live nodes"
    if cordoned:
        reason += f" ({cordoned} of {live} nodes cordoned)"
    return reason


def wanting(
    requests: Iterable[ModelRequest],
    usage: Usage,
    draining: dict[str, bool],
    now: float | None = None,
) -> list[tuple[ModelRequest, int]]:
    """Placeable requests with fewer replicas than they ask for, oldest first, with the
    number missing. `draining` maps each live node to whether it is draining;
    replicas on draining or dead nodes do not count. With `now`, a request whose
    replacement back-off (`retry_at`) runs past it waits.
    """
    # Replicas on dead or draining nodes do not count; usually there are none, and
    # then a request's count is one lookup.
    excluded = any(draining.get(n) is not False for n in usage.by_node)
    totals = usage.run_total
    todo = []
    for r in requests:
        if r.status in PLACEABLE and (now is None or r.retry_at <= now):
            active = usage.active(r.id, draining) if excluded else totals.get(r.id, 0)
            if r.replicas > active:
                todo.append((r, r.replicas - active))
    todo.sort(key=lambda item: (item[0].created_at, item[0].id))
    return todo


def plan(
    nodes: Sequence[Node],
    requests: Sequence[ModelRequest],
    placements: Sequence[Placement] = (),
    *,
    ceiling: float,
    confirmed: frozenset[str] | set[str] = frozenset(),
    usage: Usage | None = None,
    now: float = 0.0,
    new_id: Callable[[], str] = default_id,
    spared: frozenset[str] = frozenset(),
) -> Plan:
    """Place every missing replica of every placeable request that fits.

    Replicas on `spared` nodes (silent, but within the scheduler's grace) count as
    running, though nothing new is placed there.

    `nodes` are the live nodes; `placements` the current ones on them (others are
    ignored); `confirmed` the ids of placements whose engine runs and so shows in
    the nodes' telemetry. A `usage` kept by the caller replaces `placements` and
    `confirmed` (the same sums, maintained incrementally); it is only read.
    """
    if usage is None:
        usage = Usage.of(placements, confirmed)
    todo = wanting(
        requests,
        usage,
        {**dict.fromkeys(spared, False), **{n.id: n.draining for n in nodes}},
        now=now,
    )
    if not todo:  # the steady state: nothing to place, no index to build
        return Plan(new=())
    cluster = _Cluster(nodes, usage, ceiling, [r for r, _ in todo])
    new: list[Placement] = []
    pending: dict[str, tuple[str, ...]] = {}
    for request, missing in todo:
        reasons: list[str] = []
        for k in range(missing):
            placement = _place_one(cluster, request, new_id, now)
            if placement is None:
                # Every later replica of this request fails the same way.
                reason = _why_unplaced(request, cluster.cordoned, len(nodes))
                first = request.replicas - missing + k + 1
                reasons.extend(
                    f"replica {n}/{request.replicas} Pending: {reason}"
                    for n in range(first, request.replicas + 1)
                )
                break
            new.append(placement)
        if reasons:
            pending[request.id] = tuple(reasons)
    return Plan(new=tuple(new), pending=pending)


def _place_one(
    cluster: _Cluster, request: ModelRequest, new_id: Callable[[], str], now: float
) -> Placement | None:
    """One replica of `request`: on GPUs if it may run there and they have room,
    else in a CPU node's RAM; None if it fits nowhere."""
    spec = request.spec

    def placed(node: str, port: int, devices: tuple[int, ...] = ()) -> Placement:
        return Placement(new_id(), request.id, node, port, spec, devices, created_at=now)

    if spec.gpu_memory_utilization is not None:
        hit = cluster.place_gpu(request.id, spec.gpu_memory_utilization, spec.tensor_parallel_size)
        if hit is not None:
            room, devices = hit
            return placed(room.node.id, room.take_port(), devices)
    if spec.cpu_memory_gib is not None and spec.tensor_parallel_size == 1:
        cpu_room = cluster.place_cpu(request.id, spec.cpu_memory_gib)
        if cpu_room is not None:
            return placed(cpu_room.node.id, cpu_room.take_port())
    return None

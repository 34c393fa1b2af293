"""The pure placement function: behaviour by example, then invariants by hypothesis."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.models import Desired, ModelRequest, Node, Placement, Status
from nebula.scheduler.placement import EPS, plan
from nebula.scheduler.usage import Usage
from tests.builders import GIB, cpu_node, gpu_node, ids, request

CEILING = 0.9


def test_replicas_spread_across_nodes_then_gpus() -> None:
    nodes = [gpu_node("a"), gpu_node("b")]
    result = plan(nodes, [request("r", gpu=0.3, replicas=4)], [], ceiling=CEILING, new_id=ids())
    where = sorted((p.node, p.devices) for p in result.new)
    assert where == [("a", (0,)), ("a", (1,)), ("b", (0,)), ("b", (1,))]
    assert not result.pending


def test_tensor_parallel_replica_takes_gpus_of_one_node() -> None:
    nodes = [gpu_node("a", gpus=1), gpu_node("b", gpus=4, used=(0.0, 0.5, 0.0, 0.0))]
    result = plan(nodes, [request("r", gpu=0.6, tp=2)], [], ceiling=CEILING, new_id=ids())
    [p] = result.new
    assert p.node == "b" and p.devices == (0, 2)


def test_ceiling_and_real_free_memory_are_respected() -> None:
    # GPU 0 has 0.7 used by a process Nebula does not manage: only 0.3 is really free.
    nodes = [gpu_node("a", gpus=2, used=(0.7, 0.0))]
    result = plan(
        nodes,
        [request("big", gpu=0.5, created_at=1), request("small", gpu=0.3, created_at=2)],
        [],
        ceiling=CEILING,
        new_id=ids(),
    )
    placed = {p.request_id: p.devices for p in result.new}
    assert placed == {"big": (1,), "small": (0,)}
    # Now GPU 1 holds 0.5 and GPU 0 0.3: a third 0.5 fits nowhere (ceiling 0.9).
    later = plan(
        nodes,
        [request("third", gpu=0.5, created_at=3)],
        list(result.new),
        ceiling=CEILING,
        new_id=ids("q"),
    )
    assert later.new == ()
    assert later.pending == {"third": ("replica 1/1 Pending: no GPU with 0.50 free",)}


def test_confirmed_engines_are_not_counted_twice() -> None:
    # The engine of p0 runs: telemetry shows its 0.4 used, and it is also a placement.
    existing = plan(
        [gpu_node("a", gpus=1)], [request("r", gpu=0.4)], [], ceiling=CEILING, new_id=ids()
    )
    node_now = gpu_node("a", gpus=1, used=(0.4,))
    more = [request("s", gpu=0.4, created_at=1)]
    confirmed = plan(
        [node_now], more, list(existing.new), ceiling=CEILING, confirmed={"p0"}, new_id=ids("q")
    )
    assert [p.request_id for p in confirmed.new] == ["s"]
    # Unconfirmed, the same numbers would count p0 twice and leave no room.
    unconfirmed = plan([node_now], more, list(existing.new), ceiling=CEILING, new_id=ids("q"))
    assert unconfirmed.new == ()


def test_cpu_nodes_offer_ram() -> None:
    nodes = [cpu_node("c", ram_gib=24, available_gib=20)]
    result = plan(nodes, [request("chat", cpu=5, replicas=5)], [], ceiling=CEILING, new_id=ids())
    assert len(result.new) == 4  # 4 x 5 GiB of 20 GiB available
    assert result.pending == {"chat": ("replica 5/5 Pending: no CPU node with 5 GiB RAM free",)}
    assert [p.port for p in result.new] == [8100, 8101, 8102, 8103]


def test_gpu_first_then_cpu_for_models_that_run_on_both() -> None:
    nodes = [cpu_node("c"), gpu_node("g", gpus=1)]
    result = plan(
        nodes, [request("r", gpu=0.5, cpu=4, replicas=2)], [], ceiling=CEILING, new_id=ids()
    )
    assert sorted(p.node for p in result.new) == ["c", "g"]
    on_gpu = next(p for p in result.new if p.node == "g")
    assert on_gpu.devices == (0,) and on_gpu.gpu_fraction == 0.5


def test_running_replicas_are_never_moved_and_ports_never_collide() -> None:
    nodes = [gpu_node("a", gpus=1)]
    first = plan(nodes, [request("r", gpu=0.2)], [], ceiling=CEILING, new_id=ids())
    both = [request("r", gpu=0.2), request("s", gpu=0.2, replicas=2, created_at=1)]
    second = plan(nodes, both, list(first.new), ceiling=CEILING, new_id=ids("q"))
    assert {p.request_id for p in second.new} == {"s"}
    ports = [p.port for p in (*first.new, *second.new)]
    assert len(set(ports)) == len(ports) == 3


def test_port_range_exhaustion_leaves_pending() -> None:
    nodes = [gpu_node("a", gpus=1, port_min=9000, port_max=9001)]
    result = plan(nodes, [request("r", gpu=0.1, replicas=3)], [], ceiling=CEILING, new_id=ids())
    assert sorted(p.port for p in result.new) == [9000, 9001]
    assert list(result.pending) == ["r"]


def test_cordoned_nodes_take_nothing_and_the_reason_says_so() -> None:
    nodes = [gpu_node("a", cordoned=True)]
    result = plan(nodes, [request("r", gpu=0.4, replicas=2)], [], ceiling=CEILING, new_id=ids())
    assert result.new == ()
    assert result.pending["r"] == (
        "replica 1/2 Pending: no GPU with 0.40 free (1 of 1 nodes cordoned)",
        "replica 2/2 Pending: no GPU with 0.40 free (1 of 1 nodes cordoned)",
    )


def test_no_nodes_at_all() -> None:
    result = plan([], [request("r", gpu=0.4)], [], ceiling=CEILING, new_id=ids())
    assert result.pending == {"r": ("replica 1/1 Pending: no live nodes",)}


def test_draining_node_replicas_get_a_replacement_elsewhere() -> None:
    nodes = [gpu_node("a", gpus=1), gpu_node("b", gpus=1)]
    first = plan(nodes[:1], [request("r", gpu=0.5)], [], ceiling=CEILING, new_id=ids())
    draining = [replace(nodes[0], cordoned=True, draining=True), nodes[1]]
    second = plan(
        draining, [request("r", gpu=0.5)], list(first.new), ceiling=CEILING, new_id=ids("q")
    )
    assert [(p.node, p.request_id) for p in second.new] == [("b", "r")]


def test_stopping_placements_hold_their_memory() -> None:
    nodes = [gpu_node("a", gpus=1)]
    first = plan(nodes, [request("old", gpu=0.6)], [], ceiling=CEILING, new_id=ids())
    stopping = [p.stopped() for p in first.new]
    result = plan(
        nodes, [request("new", gpu=0.6, created_at=1)], stopping, ceiling=CEILING, new_id=ids("q")
    )
    assert result.new == ()


def test_oldest_request_is_served_first() -> None:
    nodes = [gpu_node("a", gpus=1)]
    reqs = [request("young", gpu=0.6, created_at=2), request("old", gpu=0.6, created_at=1)]
    result = plan(nodes, reqs, [], ceiling=CEILING, new_id=ids())
    assert [p.request_id for p in result.new] == ["old"]
    assert list(result.pending) == ["young"]


def test_unloading_and_failed_requests_get_nothing() -> None:
    nodes = [gpu_node("a")]
    reqs = [
        request("u", gpu=0.1, status=Status.UNLOADING),
        request("f", gpu=0.1, status=Status.FAILED),
    ]
    assert plan(nodes, reqs, [], ceiling=CEILING).new == ()


# ------------------------------------------------------------------ properties


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Node], list[ModelRequest], list[Placement], set[str]]:
    nodes: list[Node] = []
    for i in range(draw(st.integers(0, 5))):
        port_min = 8100
        port_max = port_min + draw(st.integers(0, 6))
        kw = {
            "port_min": port_min,
            "port_max": port_max,
            "cordoned": draw(st.booleans()) and draw(st.booleans()),
        }
        if draw(st.booleans()):
            gpus = draw(st.integers(1, 4))
            used = tuple(draw(st.sampled_from([0.0, 0.0, 0.1, 0.35, 0.8])) for _ in range(gpus))
            nodes.append(gpu_node(f"g{i}", gpus=gpus, used=used, **kw))
        else:
            ram = draw(st.sampled_from([8, 16, 24]))
            nodes.append(
                cpu_node(f"c{i}", ram_gib=ram, available_gib=ram - draw(st.integers(0, 6)), **kw)
            )
    reqs = []
    for j in range(draw(st.integers(0, 8))):
        gpu = draw(st.one_of(st.none(), st.sampled_from([0.05, 0.1, 0.25, 0.4, 0.6, 0.9, 1.0])))
        cpu = draw(st.one_of(st.none(), st.sampled_from([1.0, 2.5, 4.0, 9.0])))
        if gpu is None and cpu is None:
            cpu = 2.0
        tp = draw(st.sampled_from([1, 1, 2, 4])) if gpu is not None else 1
        reqs.append(
            request(
                f"r{j}", gpu=gpu, cpu=cpu, tp=tp, replicas=draw(st.integers(1, 4)), created_at=j
            )
        )
    # Existing placements: a first plan over a random subset of the requests.
    first = plan(
        nodes, [r for r in reqs if draw(st.booleans())], [], ceiling=CEILING, new_id=ids("old")
    )
    existing = list(first.new)
    confirmed = {p.id for p in existing if draw(st.booleans())}
    return nodes, reqs, existing, confirmed


def usage(nodes: list[Node], placements: list[Placement], confirmed: set[str]) -> tuple[dict, dict]:
    """Per GPU and per CPU node: (sum placed, sum unconfirmed)."""
    gpu: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    ram: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for p in placements:
        if p.devices:
            for d in p.devices:
                gpu[p.node, d][0] += p.gpu_fraction
                if p.id not in confirmed:
                    gpu[p.node, d][1] += p.gpu_fraction
        else:
            ram[p.node][0] += p.ram_gib
            if p.id not in confirmed:
                ram[p.node][1] += p.ram_gib
    return gpu, ram


def fits_somewhere(
    r: ModelRequest, nodes: list[Node], placements: list[Placement], confirmed: set[str]
) -> bool:
    gpu, ram = usage(nodes, placements, confirmed)
    ports: dict[str, set[int]] = defaultdict(set)
    for p in placements:
        ports[p.node].add(p.port)
    for node in nodes:
        if node.cordoned or len(ports[node.id]) >= node.port_max - node.port_min + 1:
            continue
        if node.devices and r.spec.gpu_memory_utilization is not None:
            f = r.spec.gpu_memory_utilization
            room = [
                d for d in node.devices
                if gpu[node.id, d.index][0] + f <= CEILING + EPS
                and gpu[node.id, d.index][1] + f <= d.free_fraction + EPS
            ]  # fmt: skip
            if len(room) >= r.spec.tensor_parallel_size:
                return True
        if (
            not node.devices
            and r.spec.cpu_memory_gib is not None
            and r.spec.tensor_parallel_size == 1
        ):
            g = r.spec.cpu_memory_gib
            if (
                ram[node.id][0] + g <= node.ram_total_mib / GIB * CEILING + EPS
                and ram[node.id][1] + g <= node.ram_available_mib / GIB + EPS
            ):
                return True
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_placement_invariants(
    cluster: tuple[list[Node], list[ModelRequest], list[Placement], set[str]],
) -> None:
    nodes, reqs, existing, confirmed = cluster
    result = plan(nodes, reqs, existing, ceiling=CEILING, confirmed=confirmed, new_id=ids("new"))
    everything = [*existing, *result.new]
    by_id = {n.id: n for n in nodes}

    # Running replicas are never moved: the plan only adds.
    assert all(p.id.startswith("new") for p in result.new)

    # Never oversubscribed: the ceiling, and the real free memory, per GPU and per CPU node.
    gpu, ram = usage(nodes, everything, confirmed)
    for (node_id, index), (placed, unconfirmed) in gpu.items():
        device = next(d for d in by_id[node_id].devices if d.index == index)
        assert placed <= CEILING + EPS
        new_here = sum(
            p.gpu_fraction for p in result.new if p.node == node_id and index in p.devices
        )
        if new_here:
            assert unconfirmed <= device.free_fraction + EPS
    for node_id, (placed, unconfirmed) in ram.items():
        node = by_id[node_id]
        assert placed <= node.ram_total_mib / GIB * CEILING + EPS
        if any(p.node == node_id for p in result.new):
            assert unconfirmed <= node.ram_available_mib / GIB + EPS

    # Ports never collide and stay in the node's range; TP replicas stay on one node.
    seen: set[tuple[str, int]] = set()
    for p in everything:
        node = by_id[p.node]
        assert node.port_min <= p.port <= node.port_max
        assert (p.node, p.port) not in seen
        seen.add((p.node, p.port))
        if p.devices:
            assert len(p.devices) == p.spec.tensor_parallel_size == len(set(p.devices))
    assert all(not by_id[p.node].cordoned for p in result.new)

    # Never more than wanted; never Pending while some node has room for it.
    counts: dict[str, int] = defaultdict(int)
    for p in everything:
        if p.desired is Desired.RUN:
            counts[p.request_id] += 1
    for r in reqs:
        assert counts[r.id] <= max(
            r.replicas, counts[r.id] - sum(1 for p in result.new if p.request_id == r.id)
        )
        if r.id in result.pending:
            assert counts[r.id] < r.replicas
            assert len(result.pending[r.id]) == r.replicas - counts[r.id]
            assert not fits_somewhere(r, nodes, everything, confirmed), r
        else:
            assert counts[r.id] >= r.replicas


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.data())
def test_usage_kept_incrementally_matches_usage_rebuilt(
    cluster: tuple[list[Node], list[ModelRequest], list[Placement], set[str]], data: st.DataObject
) -> None:
    """The scheduler's running sums agree with sums made from scratch, after any edits."""
    nodes, reqs, existing, confirmed = cluster
    usage = Usage.of(existing, confirmed)
    current = {p.id: p for p in existing}
    running = set(confirmed)
    extra = plan(nodes, reqs, usage=usage, ceiling=CEILING, new_id=ids("more")).new
    for p in extra:
        usage.put(p, confirmed=False)
        current[p.id] = p
    for pid in sorted(current):
        action = data.draw(st.sampled_from(["keep", "drop", "stop", "confirm", "unconfirm"]))
        if action == "drop":
            usage.drop(pid)
            del current[pid]
            running.discard(pid)
        elif action == "stop":
            current[pid] = current[pid].stopped()
            usage.put(current[pid])
        elif action in ("confirm", "unconfirm"):
            usage.confirm(pid, action == "confirm")
            (running.add if action == "confirm" else running.discard)(pid)
    rebuilt = Usage.of(current.values(), running)

    def clean(d: dict) -> dict:  # type: ignore[type-arg]
        return {k: [round(x, 9) for x in v] for k, v in d.items() if any(abs(x) > 1e-9 for x in v)}

    assert clean(usage.gpu) == clean(rebuilt.gpu)
    assert clean(usage.ram) == clean(rebuilt.ram)
    assert {k: v for k, v in usage.ports.items() if v} == {
        k: v for k, v in rebuilt.ports.items() if v
    }

    def runs(u: Usage) -> dict:  # type: ignore[type-arg]
        return {r: {n: c for n, c in v.items() if c} for r, v in u.run.items() if any(v.values())}

    assert runs(usage) == runs(rebuilt)
    assert {k: v for k, v in usage.run_total.items() if v} == {
        k: v for k, v in rebuilt.run_total.items() if v
    }
    assert usage.placements == rebuilt.placements and usage.confirmed == rebuilt.confirmed

"""The autoscaler's rule, pure: recommendations, stabilization windows, the range,
and which replicas a scale-in stops."""

from __future__ import annotations

from dataclasses import replace

from nebula.models import ModelRequest, ModelSpec, Phase, Placement, PlacementState, Status
from nebula.scheduler.autoscale import Autoscaler, extra_replicas, recommend
from nebula.scheduler.usage import Usage

SPEC = ModelSpec(name="chat", model="org/chat", cpu_memory_gib=1, max_concurrency=4)
UP, DOWN, PASS = 10.0, 30.0, 0.5


def ranged(replicas: int = 1, low: int = 1, high: int = 4) -> ModelRequest:
    return ModelRequest("chat-1", SPEC, replicas, Status.READY, min_replicas=low, max_replicas=high)


def run(
    scaler: Autoscaler, request: ModelRequest, demand: int, start: float, seconds: float
) -> tuple[ModelRequest, list[tuple[float, int]], float]:
    """Passes every PASS seconds for `seconds` at a steady demand; the request as
    changed, the changes (time, replicas), and the time reached."""
    changes = []
    now = start
    while now < start + seconds:
        for scaling in scaler.decide([request], {"chat": demand}, now):
            request = scaling.request
            changes.append((now, request.replicas))
        now += PASS
    return request, changes, now


def scaler() -> Autoscaler:
    return Autoscaler(UP, DOWN, 0.1, default_target=256)


def test_recommendation_is_the_demand_over_the_target_within_the_range() -> None:
    r = ranged(2)
    assert recommend(r, 8, 4, 0.1) == 2  # at the target: as is
    assert recommend(ranged(3), 11, 4, 0.1) == 3  # within the tolerance: as is
    assert recommend(r, 9, 4, 0.1) == 3
    assert recommend(r, 100, 4, 0.1) == 4  # the maximum
    assert recommend(r, 0, 4, 0.1) == 1  # the minimum
    assert recommend(r, 7, 4, 0.1) == 2  # below the target, but 7 still need 2


def test_a_steady_load_at_the_target_changes_nothing_for_three_windows() -> None:
    s = scaler()
    request = ranged(2)
    _, changes, _ = run(s, request, demand=8, start=0, seconds=3 * DOWN)
    assert changes == []
    # Nor does a load that wanders around it (the windows take the lowest and highest).
    now = 0.0
    for i in range(int(3 * DOWN / PASS)):
        assert s.decide([request], {"chat": 8 + (i % 2)}, now) == []
        now += PASS


def test_a_sustained_overload_scales_out_after_one_window_not_before() -> None:
    s = scaler()
    request, changes, now = run(s, ranged(1), demand=16, start=0, seconds=UP - PASS)
    assert changes == []
    request, changes, _ = run(s, request, demand=16, start=now, seconds=2 * PASS)
    assert changes == [(UP, 4)], changes
    assert request.replicas == 4


def test_a_spike_shorter_than_the_window_scales_nothing() -> None:
    s = scaler()
    request, _, now = run(s, ranged(1), demand=2, start=0, seconds=UP)
    request, changes, now = run(s, request, demand=40, start=now, seconds=UP / 2)
    request, more, _ = run(s, request, demand=2, start=now, seconds=UP)
    assert changes == more == []


def test_out_takes_the_lowest_recommendation_of_the_window() -> None:
    s = scaler()
    request, _, now = run(s, ranged(1), demand=9, start=0, seconds=UP / 2)  # 3 replicas' worth
    request, changes, _ = run(s, request, demand=16, start=now, seconds=UP)
    assert changes and changes[0][1] == 3, changes  # not 4: the load needed 3 all along


def test_back_to_the_minimum_only_after_the_down_window_and_never_below() -> None:
    s = scaler()
    request, changes, now = run(s, ranged(1), demand=16, start=0, seconds=UP + PASS)
    assert request.replicas == 4
    request, changes, now = run(s, request, demand=0, start=now, seconds=DOWN - PASS)
    assert changes == []  # the cooldown
    request, changes, now = run(s, request, demand=0, start=now, seconds=3 * DOWN)
    assert changes and changes[0][1] == 1 and request.replicas == 1, changes
    assert len(changes) == 1  # at the minimum: nothing further


def test_a_fixed_count_or_a_request_not_serving_is_never_scaled() -> None:
    s = scaler()
    fixed = replace(ranged(1), min_replicas=1, max_replicas=1)
    assert not fixed.autoscaled
    loading = replace(ranged(1), status=Status.LOADING)
    for now in range(0, 100):
        assert s.decide([fixed, loading], {"chat": 100}, float(now)) == []


def test_a_scale_in_stops_replicas_not_yet_healthy_then_the_newest() -> None:
    def placement(pid: str, at: float, node: str = "n1") -> Placement:
        return Placement(pid, "chat-1", node, 9000, SPEC, created_at=at)

    placed = [
        placement("old", 1),
        placement("new", 3),
        placement("mid", 2),
        placement("starting", 0.5),
        placement("draining", 4, node="n2"),
    ]
    usage = Usage.of(placed, ())
    states = {p.id: PlacementState(Phase.HEALTHY) for p in placed if p.id != "starting"}
    states["starting"] = PlacementState(Phase.STARTING)
    stopped = extra_replicas(ranged(2), placed, usage, states, draining={"n2"})
    assert [p.id for p, _ in stopped] == ["starting", "new"]
    assert all(reason == "scaled in to 2 replica(s)" for _, reason in stopped)

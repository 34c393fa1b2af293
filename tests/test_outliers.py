"""Passive outlier ejection (`nebula.router.outliers`), on a clock the test moves."""

from __future__ import annotations

from nebula.models import Endpoint
from nebula.router.outliers import BASE_S, MAX_S, Outliers


def endpoint(i: int) -> Endpoint:
    return Endpoint(f"p{i}", "r", "m", "n", f"http://127.0.0.1:{9000 + i}", "chat")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_connect_leaves_a_replica_out_with_a_doubling_backoff() -> None:
    clock = Clock()
    outliers = Outliers(clock)
    a, b = endpoint(1), endpoint(2)
    assert outliers.split([a, b]) == ([a, b], [])

    assert outliers.failed(a) == BASE_S
    assert outliers.split([a, b]) == ([b], [a])  # left out, kept as a last resort
    clock.now += BASE_S
    assert outliers.split([a, b]) == ([a, b], [])  # time's up: tried again
    # Failing again in a row doubles the time out, up to MAX_S.
    waits = [outliers.failed(a) for _ in range(8)]
    assert waits == [min(MAX_S, BASE_S * 2**n) for n in range(1, 9)]
    assert waits[-1] == MAX_S
    # One answer clears it.
    outliers.answered(a)
    assert outliers.split([a, b]) == ([a, b], [])
    assert outliers.failed(a) == BASE_S


def test_replicas_gone_from_the_table_are_forgotten() -> None:
    outliers = Outliers(Clock())
    a, b = endpoint(1), endpoint(2)
    outliers.failed(a)
    outliers.failed(b)
    outliers.keep_only([b.url])
    assert set(outliers.ejected) == {b.url}
    outliers.keep_only([])
    assert outliers.ejected == {}

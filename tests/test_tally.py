"""The router's lock-free per-request metrics (router/tally.py): what two processes
count adds up in one exposition, histogram buckets are Prometheus' (`le` counts
values equal to the bound), and a store that grows past its first size loses
nothing."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from harness.metrics import metric
from nebula.router.tally import FIRST_SLOTS, Tally


def exposition(tally: Tally) -> str:
    registry = CollectorRegistry()
    registry.register(tally.collector())
    return generate_latest(registry).decode()


def families(tally: Tally) -> tuple[object, object]:
    counter = tally.family("t_requests", "requests", ("model",))
    histogram = tally.family("t_seconds", "seconds", ("model",), buckets=(0.1, 1.0))
    return counter, histogram


def test_two_processes_add_up_in_one_exposition(tmp_path: Path) -> None:
    # Two Tally objects on one folder: two processes' stores (one file each).
    first, second = Tally(str(tmp_path)), Tally(str(tmp_path))
    for tally, n in ((first, 3), (second, 4)):
        counter, histogram = families(tally)
        for _ in range(n):
            tally.counter(counter, "m").inc()  # type: ignore[arg-type]
            tally.histogram(histogram, "m").observe(0.1)  # type: ignore[arg-type]
        tally.histogram(histogram, "m").observe(5.0)  # type: ignore[arg-type]
    text = exposition(first)
    first.close()
    second.close()
    assert metric(text, "t_requests_total", model="m") == 7
    assert metric(text, "t_seconds_bucket", model="m", le="0.1") == 7  # equal to the bound
    assert metric(text, "t_seconds_bucket", model="m", le="1.0") == 7
    assert metric(text, "t_seconds_bucket", model="m", le="+Inf") == 9
    assert metric(text, "t_seconds_count", model="m") == 9
    assert abs(metric(text, "t_seconds_sum", model="m") - (7 * 0.1 + 2 * 5.0)) < 1e-9


def test_a_store_that_grows_keeps_every_count(tmp_path: Path) -> None:
    for folder in (str(tmp_path), None):  # a shared file, and plain memory
        tally = Tally(folder)
        counter, _ = families(tally)
        cells = [tally.counter(counter, f"m{i}") for i in range(FIRST_SLOTS + 5)]  # type: ignore[arg-type]
        for i, cell in enumerate(cells):
            cell.inc(i)
        text = exposition(tally)
        tally.close()
        assert metric(text, "t_requests_total") == sum(range(FIRST_SLOTS + 5)), folder
        assert metric(text, "t_requests_total", model=f"m{FIRST_SLOTS + 4}") == FIRST_SLOTS + 4

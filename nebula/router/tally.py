"""The router's per-request metrics, counted without locks in each process's own memory.

prometheus_client's multiprocess mode takes a process-wide lock, checks the pid
and packs two doubles into a shared file at every write: 1.5 us for a counter,
3 us for a histogram, and a request makes 6 to 10 writes. A router process is
the only writer of its own counts, so none of that is needed: here each process
owns a file of doubles mapped into memory, and a write is an addition into it
(about 0.1 us). An index file beside it names each series' slots. /metrics, in
whichever process, reads every process's files, so what it shows is exact at
that moment, never a flush behind. With one process (no multiprocess folder),
the doubles live in plain memory.

The files of a process that died stay, so that counters never go backwards (as
in prometheus_client's multiprocess mode); `nebula router` removes the folder
when it stops. Only the metrics a request touches live here (router_metrics);
the others stay prometheus_client's.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
from array import array
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

FIRST_SLOTS = 4096  # doubles; the store doubles its size when a new series needs room
Labels = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Family:
    """A metric: a counter, or a histogram with these upper bounds."""

    name: str
    doc: str
    labels: Labels = ()
    buckets: tuple[float, ...] | None = None

    @property
    def width(self) -> int:
        """Slots per series: a counter's value; a histogram's buckets, +Inf and sum."""
        return 1 if self.buckets is None else len(self.buckets) + 2


class Store:
    """One process's doubles (in a mapped file, or in memory) and where each series is."""

    def __init__(self, folder: str | None) -> None:
        self.slots: dict[tuple[str, Labels], int] = {}
        self.used = 0
        self.folder = folder
        self._map: mmap.mmap | None = None
        self._buffer: bytearray | None = None
        if folder is None:
            self._buffer = bytearray(FIRST_SLOTS * 8)
            self.values = memoryview(self._buffer).cast("d")
            return
        stem = Path(folder) / f"tally-{os.getpid()}-{secrets.token_hex(4)}"
        self._file = open(f"{stem}.val", "w+b")  # noqa: SIM115 (held open while mapped)
        self._index = open(f"{stem}.idx", "a", encoding="utf-8")  # noqa: SIM115
        self._file.truncate(FIRST_SLOTS * 8)
        self._map = mmap.mmap(self._file.fileno(), FIRST_SLOTS * 8)
        self.values = memoryview(self._map).cast("d")

    def allocate(self, family: Family, labels: Labels) -> int:
        """The first slot of a new series (room made first, then named in the index,
        so that a reader never finds a slot beyond the file's end)."""
        at = self.used
        if at + family.width > len(self.values):
            self._grow(2 * (at + family.width))
        self.used += family.width
        self.slots[(family.name, labels)] = at
        if self.folder is not None:
            self._index.write(json.dumps({"s": at, "n": family.name, "l": labels}) + "\n")
            self._index.flush()
        return at

    def _grow(self, slots: int) -> None:
        # The old doubles are not released here: a /metrics thread may be reading them
        # this moment. They go when the last reference does.
        if self._buffer is not None:
            self._buffer = self._buffer + bytes(slots * 8 - len(self._buffer))
            self.values = memoryview(self._buffer).cast("d")
            return
        self._file.truncate(slots * 8)
        self._map = mmap.mmap(self._file.fileno(), slots * 8)
        self.values = memoryview(self._map).cast("d")

    def close(self) -> None:
        """Let the files go (a process's store lives as long as it does: for tests)."""
        if self.folder is not None:
            self.values.release()
            if self._map is not None:
                self._map.close()
            self._file.close()
            self._index.close()

    def series(self, widths: dict[str, int]) -> Iterator[tuple[str, Labels, list[float]]]:
        """This process's series and their values now."""
        values = self.values
        for (name, labels), at in list(self.slots.items()):
            yield name, labels, list(values[at : at + widths[name]])


def read_folder(folder: str, widths: dict[str, int]) -> Iterator[tuple[str, Labels, list[float]]]:
    """Every process's series, from its files in `folder`, as they are now."""
    for index in sorted(Path(folder).glob("tally-*.idx")):
        try:
            lines = index.read_text(encoding="utf-8").splitlines()
            data = array("d")
            data.frombytes(index.with_suffix(".val").read_bytes())
        except (OSError, ValueError):
            continue  # a process stopping now: its counts are in its last scrape
        for line in lines:
            try:
                entry = json.loads(line)
                name, at, labels = entry["n"], entry["s"], tuple(entry["l"])
            except (ValueError, KeyError, TypeError):
                continue  # a line being written now
            width = widths.get(name)
            if width is not None and at + width <= len(data):
                yield name, labels, list(data[at : at + width])


class Counter:
    __slots__ = ("at", "store")

    def __init__(self, store: Store, at: int) -> None:
        self.store, self.at = store, at

    def inc(self, amount: float = 1.0) -> None:
        self.store.values[self.at] += amount


class Histogram:
    __slots__ = ("at", "bounds", "store", "sum_at")

    def __init__(self, store: Store, at: int, bounds: tuple[float, ...]) -> None:
        self.store, self.at, self.bounds = store, at, bounds
        self.sum_at = at + len(bounds) + 1

    def observe(self, value: float) -> None:
        values = self.store.values
        values[self.at + bisect_left(self.bounds, value)] += 1.0  # le: value <= bound
        values[self.sum_at] += value


class Tally:
    """This process's families and their series; `collector` shows them (and every
    other process's) to Prometheus."""

    def __init__(self, folder: str | None) -> None:
        self.folder = folder
        self.families: dict[str, Family] = {}
        self._store: Store | None = None  # made at the first write: after a fork or spawn

    def family(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] | None = None,
    ) -> Family:
        family = Family(name, doc, tuple(labels), tuple(buckets) if buckets else None)
        self.families[name] = family
        return family

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.folder)
        return self._store

    def counter(self, family: Family, *labels: str) -> Counter:
        assert family.buckets is None, family.name
        return Counter(self.store, self._slot(family, labels))

    def histogram(self, family: Family, *labels: str) -> Histogram:
        assert family.buckets is not None, family.name
        return Histogram(self.store, self._slot(family, labels), family.buckets)

    def _slot(self, family: Family, labels: Labels) -> int:
        if len(labels) != len(family.labels):
            raise ValueError(f"{family.name} takes labels {family.labels}, not {labels}")
        at = self.store.slots.get((family.name, labels))
        return self.store.allocate(family, labels) if at is None else at

    def collector(self) -> Collector:
        return _Collector(self)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


class _Collector(Collector):
    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def collect(self) -> Iterator[Any]:
        tally = self.tally
        widths = {name: f.width for name, f in tally.families.items()}
        if tally.folder is not None:
            source = read_folder(tally.folder, widths)
        else:
            source = tally.store.series(widths) if tally._store is not None else iter(())
        sums: dict[str, dict[Labels, list[float]]] = {name: {} for name in tally.families}
        for name, labels, values in source:
            if name not in sums:
                continue
            total = sums[name].setdefault(labels, [0.0] * len(values))
            for i, v in enumerate(values):
                total[i] += v
        for name, series in sums.items():
            yield _family(tally.families[name], series)


def _family(family: Family, series: dict[Labels, list[float]]) -> Any:
    if family.buckets is None:
        counter = CounterMetricFamily(family.name, family.doc, labels=family.labels)
        for labels, values in sorted(series.items()):
            counter.add_metric(list(labels), values[0])
        return counter
    histogram = HistogramMetricFamily(family.name, family.doc, labels=family.labels)
    bounds = [*(_le(b) for b in family.buckets), "+Inf"]
    for labels, values in sorted(series.items()):
        cumulative, buckets = 0.0, []
        for bound, count in zip(bounds, values[:-1], strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        histogram.add_metric(list(labels), buckets, values[-1])
    return histogram


def _le(bound: float) -> str:
    """A bucket's bound as prometheus_client prints it (0.5, 1.0, 60.0)."""
    return repr(float(bound))

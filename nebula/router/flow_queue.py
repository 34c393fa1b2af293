"""Flow control's queue of one model: pure, no I/O (`flow` drives it).

Priority bands, served in order; within a band a FIFO per key, the keys served
round-robin (one request each in turn)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass, field

BANDS = ("high", "normal", "low")  # precedence: first served first
BAND_OF = {name: i for i, name in enumerate(BANDS)}


@dataclass(eq=False, slots=True)
class Ticket:
    """One waiting request."""

    key: str
    band: int
    seq: int
    queued_at: float
    granted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    refusal: Exception | None = None  # pushed out of a full queue by a higher band


class ModelQueue:
    """One model's waiting requests: bands, and within each a FIFO per key served
    round-robin."""

    def __init__(self) -> None:
        self.bands: list[OrderedDict[str, deque[Ticket]]] = [OrderedDict() for _ in BANDS]
        self.depth = 0

    def push(self, ticket: Ticket) -> None:
        band = self.bands[ticket.band]
        band.setdefault(ticket.key, deque()).append(ticket)
        self.depth += 1

    def pop(self) -> Ticket | None:
        """The next request to send: the highest band's next key in turn."""
        for band in self.bands:
            if not band:
                continue
            key, fifo = next(iter(band.items()))
            ticket = fifo.popleft()
            if fifo:
                band.move_to_end(key)  # its turn is over: the other keys go first
            else:
                del band[key]
            self.depth -= 1
            return ticket
        return None

    def remove(self, ticket: Ticket) -> bool:
        band = self.bands[ticket.band]
        fifo = band.get(ticket.key)
        if fifo is None or ticket not in fifo:
            return False
        fifo.remove(ticket)
        if not fifo:
            del band[ticket.key]
        self.depth -= 1
        return True

    def newest_below(self, band: int) -> Ticket | None:
        """The newest request in the lowest non-empty band below `band`, if any."""
        for lower in range(len(BANDS) - 1, band, -1):
            fifos = self.bands[lower]
            if fifos:
                return max((fifo[-1] for fifo in fifos.values()), key=lambda t: t.seq)
        return None

    def next_band(self) -> int | None:
        """The band `pop` takes from next (None: empty)."""
        return next((i for i, band in enumerate(self.bands) if band), None)

    def waiting(self, band: int) -> int:
        return sum(len(fifo) for fifo in self.bands[band].values())

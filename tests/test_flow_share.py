"""How router processes share a model's slots, and the queue's order: pure."""

from __future__ import annotations

import asyncio

from nebula.models import Demand
from nebula.router.flow_queue import ModelQueue, Ticket
from nebula.router.flow_share import share

IDLE = Demand((0, 0, 0), 0)


def demand(high: int = 0, normal: int = 0, low: int = 0) -> Demand:
    return Demand((high, normal, low), 0)


def shares(slots: int, asked: dict[str, Demand]) -> dict[str, int]:
    return {who: share(slots, asked, who) for who in asked}


def test_the_shares_add_up_to_the_slots_whatever_is_asked() -> None:
    for asked in (
        {"a": demand(low=7), "b": demand(low=3)},
        {"a": demand(high=1, low=20), "b": demand(normal=5), "c": IDLE},
        {"a": IDLE, "b": IDLE, "c": IDLE},
        {"a": demand(normal=1), "b": demand(normal=1), "c": demand(normal=1)},
    ):
        for slots in (1, 2, 5, 16):
            assert sum(shares(slots, asked).values()) == slots, (slots, asked)


def test_higher_bands_are_met_first_across_processes() -> None:
    # The batch process asks for everything; the interactive one's request comes first.
    got = shares(4, {"batch": demand(low=20), "chat": demand(high=1)})
    assert got == {"batch": 3, "chat": 1}
    got = shares(4, {"batch": demand(low=20, normal=2), "chat": demand(high=3)})
    assert got == {"batch": 1, "chat": 3}


def test_a_band_short_of_slots_is_split_by_what_each_asks() -> None:
    got = shares(10, {"a": demand(low=30), "b": demand(low=10)})
    assert got == {"a": 8, "b": 2}  # 7.5 and 2.5: the tie goes to the first name


def test_spare_slots_go_evenly_so_a_burst_anywhere_starts_at_once() -> None:
    got = shares(8, {"a": demand(normal=2), "b": IDLE, "c": IDLE})
    assert got["a"] >= 4 and got["b"] >= 1 and got["c"] >= 1


def test_the_queue_serves_bands_in_order_and_keys_in_turn() -> None:
    async def order() -> list[str]:
        queue = ModelQueue()
        seq = iter(range(100))
        for key, band, n in (("heavy", 1, 5), ("light", 1, 2), ("batch", 2, 2), ("vip", 0, 1)):
            for _ in range(n):
                queue.push(Ticket(key, band, next(seq), 0.0))
        assert queue.next_band() == 0 and queue.depth == 10
        assert queue.newest_below(0) is not None and queue.newest_below(0).key == "batch"
        out = []
        while (ticket := queue.pop()) is not None:
            out.append(ticket.key)
        return out

    assert asyncio.run(order()) == [
        "vip",
        "heavy", "light", "heavy", "light", "heavy", "heavy", "heavy",
        "batch", "batch",
    ]  # fmt: skip

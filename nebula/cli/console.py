"""How nebula-cli and nebula-shell print: tables for people (colour only on a
terminal), JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

STATUS_COLOURS = {
    "Ready": "32",
    "Healthy": "32",
    "Degraded": "33",
    "Loading": "36",
    "Starting": "36",
    "Scheduled": "36",
    "Pending": "33",
    "Unloading": "35",
    "Stopping": "35",
    "Failed": "31",
}


class Output:
    """Tables for people (colour only on a terminal), JSON for scripts."""

    def __init__(self, stream: TextIO, as_json: bool, colour: bool | None = None) -> None:
        self.stream = stream
        self.as_json = as_json
        self.colour = stream.isatty() if colour is None else colour

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def data(self, value: Any) -> None:
        self.line(json.dumps(value, indent=2, sort_keys=True))

    def paint(self, text: str) -> str:
        code = STATUS_COLOURS.get(text)
        return f"\033[{code}m{text}\033[0m" if code and self.colour else text

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> None:
        if not rows:
            self.line(empty)
            return
        cells = [[str(c) for c in row] for row in rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        self.line(
            "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
        )
        for row in cells:
            padded = [self.paint(c) + " " * (w - len(c)) for c, w in zip(row, widths, strict=True)]
            self.line("  ".join(padded).rstrip())


def age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.0f}m"


def gib(mib: float) -> str:
    return f"{mib / 1024:.1f}"


def resources(node: dict[str, Any]) -> str:
    if node["devices"]:
        parts = [
            f"GPU{d['index']} {gib(d['memory_used_mib'])}/{gib(d['memory_total_mib'])}GiB "
            f"{d['utilization_pct']:.0f}%"
            for d in node["devices"]
        ]
        return ", ".join(parts)
    used = node["ram_total_mib"] - node["ram_available_mib"]
    return f"{node['cpu_count']} CPU, RAM {gib(used)}/{gib(node['ram_total_mib'])}GiB"


def node_rows(nodes: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for n in nodes:
        mark = "draining" if n["draining"] else "cordoned" if n["cordoned"] else "ready"
        rows.append([n["id"], n["address"], age(n["heartbeat_age_s"]), mark, resources(n)])
    return rows

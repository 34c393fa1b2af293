"""Keep-alive durations, as operators write them (Ollama's meaning).

"10m", "30s", "1h", "1h30m", "90" (seconds), 0 (unload right after the last
request), "never" or any negative number (pinned: never unloaded when idle)
"""

from __future__ import annotations

import math
import re

from nebula.errors import InvalidRequest

NEVER_WORDS = frozenset({"never", "forever", "inf", "infinity"})
_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s|ms)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
MAX_S = 365 * 86400.0
RULE = 'a duration like "30s", "10m", "1h30m", seconds as a number, 0, or "never"'


def parse_keep_alive(value: object, what: str = "keep_alive") -> float | None:
    """Seconds, or None for never; `InvalidRequest` saying what is wrong."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{what} must be {RULE}, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in NEVER_WORDS:
            return None
        try:
            seconds = float(text)
        except ValueError:
            if not text or _PART.sub("", text):
                raise InvalidRequest(f"{what} must be {RULE}, not {value[:40]!r}") from None
            seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _PART.findall(text))
    else:
        raise InvalidRequest(f"{what} must be {RULE}, not {type(value).__name__}")
    if math.isnan(seconds):
        raise InvalidRequest(f"{what} must be {RULE}")
    if seconds < 0 or math.isinf(seconds):
        return None
    if seconds > MAX_S:
        raise InvalidRequest(f'{what} is at most a year; use "never" to pin a model')
    return seconds


def show_duration(seconds: float | None) -> str:
    """A keep-alive or an idle time for people: "never", "45s", "10m", "2h5m"."""
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m" if minutes else f"{hours}h"

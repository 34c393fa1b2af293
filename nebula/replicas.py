"""A replica count or range, as operators write it: `2`, or `1..4` (autoscaled
between 1 and 4, starting at 1)."""

from __future__ import annotations

from nebula.errors import InvalidRequest

MAX_REPLICAS = 256


def parse_replicas(value: object, what: str = "replicas") -> tuple[int, int]:
    """(minimum, maximum) replicas; equal when the count is fixed."""
    text = str(value).strip() if isinstance(value, (int, str)) else None
    if isinstance(value, bool) or text is None:
        raise InvalidRequest(f"{what} must be a count (2) or a range (1..4), not {value!r}")
    low, sep, high = text.partition("..")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise InvalidRequest(
            f"{what} must be a count (2) or a range MIN..MAX (1..4), not {value!r}"
        ) from None
    if not 1 <= lo <= MAX_REPLICAS or not 1 <= hi <= MAX_REPLICAS:
        raise InvalidRequest(f"{what} must be between 1 and {MAX_REPLICAS}, not {text}")
    if hi < lo:
        raise InvalidRequest(f"{what}: the range {text} ends below its start; write MIN..MAX")
    return lo, hi


def show_replicas(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}..{high}"

"""What a client key may do: its models, on-demand loads, priority and token budget.

Pure rules, shared by the admin API (which checks what an operator asks for) and
the router (which applies them per request). A key's scope is stored with the
key (`store/api_keys.py`); its spend is kept in Redis per budget period
(`store/usage.py`).

Budget periods are UTC calendar periods: a daily budget resets at 00:00 UTC, a
monthly one on the 1st at 00:00 UTC, the same instant for every router.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from collections.abc import Iterable

from nebula.errors import InvalidRequest

PRIORITIES = ("low", "normal", "high")
PERIODS = ("day", "month")
# A model pattern: a model name in which `*`, `?` and `[...]` may stand for characters.
PATTERN_RE = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,64}$")
MAX_PATTERNS = 64
MAX_BUDGET = 10**15  # tokens; far past any real period, and exact in a float


def check_models(value: object) -> tuple[str, ...]:
    """The model patterns a key may use (empty: every model)."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or len(value) > MAX_PATTERNS:
        raise InvalidRequest(
            f"`models` must be a list of at most {MAX_PATTERNS} model names or "
            'globs ("chat-*"), or null for every model'
        )
    for pattern in value:
        if not isinstance(pattern, str) or not PATTERN_RE.match(pattern):
            raise InvalidRequest(
                "each of `models` must be a model name or a glob of 1-64 letters, digits, "
                f"'.', '_', '-', '*', '?' or '[...]'; got {str(pattern)[:40]!r}"
            )
    return tuple(value)


def check_priority(value: object) -> str:
    if value is None:
        return "normal"
    if value not in PRIORITIES:
        raise InvalidRequest(f"`priority` must be one of {', '.join(PRIORITIES)}")
    return str(value)


def check_budget(tokens: object, period: object) -> tuple[int | None, str]:
    """A token budget (None: no budget) and its period."""
    period = "day" if period is None else period
    if period not in PERIODS:
        raise InvalidRequest(f"`budget_period` must be one of {', '.join(PERIODS)}")
    if tokens is None:
        return None, str(period)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= MAX_BUDGET:
        raise InvalidRequest(
            f"`token_budget` must be a whole number of tokens from 1 to "
            f"{MAX_BUDGET:.0e}, or null for no budget"
        )
    return tokens, str(period)


def allows(patterns: Iterable[str], model: str) -> bool:
    """May a key with these patterns use `model`? (No patterns: every model.)"""
    patterns = tuple(patterns)
    return not patterns or any(fnmatch.fnmatchcase(model, p) for p in patterns)


def period_of(period: str, now: float) -> tuple[str, float]:
    """The id of the budget period that holds `now` (unix seconds), and when it ends."""
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "month":
        start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + dt.timedelta(days=32)).replace(day=1)
        return start.strftime("%Y-%m"), end.timestamp()
    start = at.replace(hour=0, minute=0, second=0, microsecond=0)
    return start.strftime("%Y-%m-%d"), (start + dt.timedelta(days=1)).timestamp()


def day_of(now: float) -> str:
    """The UTC day usage is counted under."""
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")

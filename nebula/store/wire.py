"""What every stored value has in common: a layout version, and tolerance.

Each store encodes and decodes its own aggregate; this module holds the rules
they share. Every JSON value and every hash carries `v`, the layout version.
A reader takes the fields it knows and ignores the rest, so during a rolling
upgrade a newer writer never crashes an older reader; a field a reader expects
but an older writer did not write takes its default. `v` goes up only when a
field changes meaning, so a reader can tell the layouts apart.

A value a reader cannot read at all (malformed JSON, a missing field, a status
or phase it does not know) is skipped and logged (`readable`): one bad record
never stops a routing table, a scheduler pass or an agent. Where skipping a
record would read as "it is gone" and so stop something, the reader is told
which keys it skipped, and leaves what they name alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from functools import cache
from typing import Any, TypeVar, cast

from nebula.models import ModelSpec, Task

VERSION = 1
VERSION_FIELD = "v"

# What decoding a value that is not what the reader expects raises.
UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, RecursionError)
# Skipped values logged at WARNING (the first time each); later ones at DEBUG.
_LOGGED_LIMIT = 1000
_logged: set[tuple[str, str]] = set()

log = logging.getLogger(__name__)
R = TypeVar("R")
T = TypeVar("T")


def skipped(what: str, key: object, exc: BaseException) -> None:
    """Log a value that could not be read (once at WARNING per value: a refresh that
    meets it every second must not flood the log)."""
    seen = (what, str(key)[:200])
    level = logging.DEBUG if seen in _logged else logging.WARNING
    if len(_logged) < _LOGGED_LIMIT:
        _logged.add(seen)
    log.log(
        level,
        "skipping a stored %s that cannot be read (%s: %s): %s; a newer Nebula may have written it",
        what,
        type(exc).__name__,
        str(exc)[:200],
        str(key)[:200],
    )


def readable(decode: Callable[[R], T], raws: Iterable[R], what: str) -> list[T]:
    """`decode` of each raw value, skipping (and logging) those it cannot read."""
    out = []
    for raw in raws:
        try:
            out.append(decode(raw))
        except UNREADABLE as exc:
            skipped(what, raw, exc)
    return out


def readable_items(
    decode: Callable[[R], T], raws: dict[str, R], what: str
) -> tuple[dict[str, T], set[str]]:
    """`decode` of each value of a hash, by field; and the fields it could not read."""
    out: dict[str, T] = {}
    bad: set[str] = set()
    for field_name, raw in raws.items():
        try:
            out[field_name] = decode(raw)
        except UNREADABLE as exc:
            skipped(what, field_name, exc)
            bad.add(field_name)
    return out, bad


@cache
def _names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of `data` that are fields of the dataclass `cls`."""
    names = _names(cls)
    return {k: v for k, v in data.items() if k in names}


def dumps(data: dict[str, Any]) -> str:
    return json.dumps({VERSION_FIELD: VERSION, **data})


def spec_from_dict(data: dict[str, Any]) -> ModelSpec:
    given = known(ModelSpec, data)
    given["task"] = Task(given.get("task", Task.CHAT))
    given["engine_args"] = tuple(given.get("engine_args", ()))
    return ModelSpec(**given)


# Every connection reads with `decode_responses`: keys, fields and values come
# back as str, which redis-py's types widen to `bytes | str`. These say so once.


def text_hash(raw: object) -> dict[str, str]:
    """A hash as read (HGETALL)."""
    return cast(dict[str, str], raw)


def texts(raw: Iterable[object]) -> list[str]:
    """Members or keys as read (SMEMBERS, HKEYS, ZRANGE)."""
    return cast(list[str], list(raw))


def for_hset(fields: Mapping[str, str | int | float]) -> Mapping[Any, Any]:
    """A str-keyed mapping for `HSET ... mapping=` (typed there with an invariant key)."""
    return fields

"""What every stored value has in common: a layout version, and tolerance.

Each store encodes and decodes its own aggregate; this module holds the rules
they share. Every JSON value and every hash carries `v`, the layout version.
A reader takes the fields it knows and ignores the rest, so during a rolling
upgrade a newer writer never crashes an older reader; a field a reader expects
but an older writer did not write takes its default. `v` goes up only when a
field changes meaning, so a reader can tell the layouts apart.
"""

from __future__ import annotations

import json
from dataclasses import fields
from functools import cache
from typing import Any

from nebula.models import ModelSpec, Task

VERSION = 1
VERSION_FIELD = "v"


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

"""The shapes that names, ids and free text from outside may take.

Everything a client or an admin sends that Nebula keeps, puts in a Redis key,
a file name, a URL or a config file passes one of these checks first, so input
stays data: no control character (a newline starts a new line of a config
file), no path separator, no character a shell or an INI parser reads as
syntax, and a bounded length.
"""

from __future__ import annotations

import re

from nebula.errors import InvalidRequest

# Model names, node ids, key names: what the catalog already allows.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"

# Request ids are `<model name>-<6 hex>`; placement ids add a replica suffix.
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators
# (str.splitlines() breaks on them, and so may a reader of a config file).
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u0085]")


def check_name(value: object, what: str) -> str:
    """`value` if it is a well-formed name, else `InvalidRequest` saying what a name is."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidRequest(f"{what} must be {NAME_RULE}; got {shown(value)}")
    return value


def check_ref(value: object, what: str) -> str:
    """A model name or request id, as a path segment of the admin API."""
    if not isinstance(value, str) or not REF_RE.match(value):
        raise InvalidRequest(
            f"{what} must be a model name or request id ({NAME_RULE}); got {shown(value)}"
        )
    return value


def has_control(value: str) -> bool:
    return CONTROL_RE.search(value) is not None


def shown(value: object, limit: int = 40) -> str:
    """`value` for an error message: repr'd (so control characters show escaped), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""The one error hierarchy.

Every error a person can cause or meet is a `NebulaError` with a message that
says what was wrong and what to do. Entry points print the message on one line
and exit non-zero; the admin API maps `status` to its HTTP status code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


def validation_problems(exc: ValidationError, whole: str = "entry") -> str:
    """pydantic's errors on one line: `field: what is wrong; ...` (`whole` names
    an error about the object itself)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or whole}: "
        f"{str(err['msg']).removeprefix('Value error, ')}"
        for err in exc.errors()
    )


class NebulaError(Exception):
    """Base of every error Nebula raises on purpose."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(NebulaError):
    """Settings or a configuration file are invalid."""

    code = "config_error"


class CatalogError(NebulaError):
    """The model catalog is malformed or does not name the model asked for."""

    status = 400
    code = "catalog_error"


class InvalidRequest(NebulaError):
    """A request's input is invalid; nothing was changed."""

    status = 400
    code = "invalid_request"


class NotFound(NebulaError):
    """The named object (model request, node, model) does not exist."""

    status = 404
    code = "not_found"


class Conflict(NebulaError):
    """The request conflicts with current state (the model is already loaded)."""

    status = 409
    code = "conflict"


class StateUnavailable(NebulaError):
    """Redis, the state store, cannot be reached."""

    status = 503
    code = "state_unavailable"

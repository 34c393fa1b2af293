"""The agent's own check of each placement, before it writes a program: Redis is not
trusted to say what a node runs.

A placement names a model of the catalog and carries its spec (hub id, engine,
prepared folder, engine arguments). Whoever can write to Redis could put any
spec there: a model path of their choosing, `--trust-remote-code`, a reserved
flag. So the agent checks the spec against its own node's catalog file (the
operator's trusted input, as the API does): the model, engine, prepared folder
and task must be the catalog's, and the engine arguments must be the catalog's
own followed only by what the admin API may add (`engine_flags.check_api_args`).
A placement that fails is marked Failed with the reason, and never started.
"""

from __future__ import annotations

from nebula.catalog import Catalog, load_catalog
from nebula.engine_flags import check_api_args, normalize
from nebula.errors import InvalidRequest
from nebula.models import ModelSpec
from nebula.settings import Settings

PINNED = ("model", "engine", "prepared", "task")


def node_catalog(settings: Settings) -> Catalog:
    """The catalog file this node's placements are checked against."""
    return load_catalog(settings.catalog_path, allow_test_engine=settings.allow_test_engine)


def vet(spec: ModelSpec, catalog: Catalog) -> None:
    """Raise InvalidRequest (saying why) unless `spec` is one the admin API could ask."""
    entry = catalog.get(spec.name)
    if entry is None:
        raise InvalidRequest(
            f"refused: model {spec.name!r} is not in this node's catalog ({catalog.source}); "
            "a node runs only its catalog's models"
        )
    for field in PINNED:
        if getattr(spec, field) != getattr(entry, field):
            raise InvalidRequest(
                f"refused: the placement's {field} {str(getattr(spec, field))[:80]!r} is not "
                f"this node's catalog's for {spec.name} ({str(getattr(entry, field))[:80]!r})"
            )
    args = normalize(spec.engine_args)
    own = len(entry.engine_args)
    if args[:own] != entry.engine_args:
        raise InvalidRequest(
            f"refused: the placement's engine arguments for {spec.name} do not start with "
            "this node's catalog's"
        )
    try:
        check_api_args(list(args[own:]))
    except InvalidRequest as exc:
        raise InvalidRequest(f"refused: {exc.message}") from None

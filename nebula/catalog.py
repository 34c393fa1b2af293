"""The model catalog: a TOML file of named models, validated as a whole on load.

A malformed entry is a `CatalogError` naming the file, the entry and the
reason; nothing of a bad catalog is used.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nebula.durations import parse_keep_alive
from nebula.engine_flags import check_api_args, check_catalog_args
from nebula.errors import CatalogError, InvalidRequest, NotFound, validation_problems
from nebula.models import ModelSpec, Task
from nebula.names import NAME_RE, NAME_RULE, has_control, shown
from nebula.replicas import parse_replicas, show_replicas

OVERRIDABLE = frozenset(
    {"gpu_memory_utilization", "cpu_memory_gib", "tensor_parallel_size", "engine_args"}
)


# Nebula's own OpenAI-compatible fake (nebula/testengine/), for test clusters only.
TEST_ENGINE = "test"


class CatalogEntry(BaseModel):
    """Schema of one `[models.NAME]` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    task: Literal["chat", "embedding"] = "chat"
    engine: Literal["vllm", "test"] = "vllm"  # "test": see TEST_ENGINE
    prepared: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    cpu_memory_gib: float | None = Field(None, gt=0)
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    engine_args: list[str] = Field(default_factory=list)
    # Longest wait for in-flight requests on unload; the node's drain_timeout_s if unset.
    drain_timeout_s: float | None = Field(None, ge=0, le=86400)
    # May a client's request load it (where NEBULA_ON_DEMAND allows)?
    on_demand: bool = True
    # Idle time before an on-demand load unloads ("10m", 0, "never"); else NEBULA_KEEP_ALIVE.
    keep_alive: str | None = None
    # Requests one replica should work on at once (flow control, autoscaling); unset:
    # the engine's --max-num-seqs, else NEBULA_MAX_CONCURRENCY.
    max_concurrency: int | None = Field(None, ge=1, le=65536)
    # Replicas when a load names none (on-demand loads too): a count, or MIN..MAX to
    # follow the load (see docs/operations.md, "Overload").
    replicas: str | int | None = None

    @field_validator("replicas")
    @classmethod
    def _replica_range(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            try:
                parse_replicas(value)
            except InvalidRequest as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: object) -> str | None:
        if value is None or value == "":
            return None
        try:
            parse_keep_alive(value)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return str(value)

    @field_validator("model")
    @classmethod
    def _plain_model(cls, model: str) -> str:
        if has_control(model):
            raise ValueError(f"{shown(model)} holds a control character")
        return model

    @field_validator("engine_args")
    @classmethod
    def _normal_args(cls, args: list[str]) -> list[str]:
        # One spelling (`--max_model_len=8` is `--max-model-len 8`), none of Nebula's own.
        try:
            return list(check_catalog_args(args))
        except InvalidRequest as exc:
            raise ValueError(exc.message.removeprefix("engine_args: ")) from None

    @model_validator(mode="after")
    def _needs_memory(self) -> CatalogEntry:
        if self.gpu_memory_utilization is None and self.cpu_memory_gib is None:
            raise ValueError("set gpu_memory_utilization (GPU nodes), cpu_memory_gib, or both")
        if self.tensor_parallel_size > 1 and self.gpu_memory_utilization is None:
            raise ValueError("tensor_parallel_size > 1 needs GPUs: set gpu_memory_utilization")
        return self

    def spec(self, name: str) -> ModelSpec:
        low, high = parse_replicas(self.replicas) if self.replicas is not None else (None, None)
        return ModelSpec(
            name=name,
            model=self.model,
            task=Task(self.task),
            engine=self.engine,
            prepared=self.prepared,
            gpu_memory_utilization=self.gpu_memory_utilization,
            cpu_memory_gib=self.cpu_memory_gib,
            tensor_parallel_size=self.tensor_parallel_size,
            engine_args=tuple(self.engine_args),
            drain_timeout_s=self.drain_timeout_s,
            on_demand=self.on_demand,
            keep_alive=self.keep_alive or "",
            max_concurrency=self.max_concurrency,
            min_replicas=low,
            max_replicas=high,
        )


@dataclass(frozen=True)
class Catalog(Mapping[str, ModelSpec]):
    """Named model specs, read from one file."""

    source: str
    specs: Mapping[str, ModelSpec]

    def __getitem__(self, name: str) -> ModelSpec:
        return self.specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def get_spec(self, name: str) -> ModelSpec:
        """The spec named `name`, or `NotFound` listing the names that exist."""
        try:
            return self.specs[name]
        except KeyError:
            known = ", ".join(sorted(self.specs)) or "none"
            raise NotFound(
                f"model {name!r} is not in the catalog ({self.source}); known models: {known}"
            ) from None

    def resolve(self, name: str, overrides: Mapping[str, Any] | None = None) -> ModelSpec:
        """The spec for `name` with per-request overrides applied and validated."""
        spec = self.get_spec(name)
        if not overrides:
            return spec
        unknown = set(overrides) - OVERRIDABLE
        if unknown:
            raise InvalidRequest(
                f"cannot override {', '.join(sorted(unknown))}; "
                f"overridable: {', '.join(sorted(OVERRIDABLE))}"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "engine_args" in given:
            # Over the network only allowlisted flags, after the catalog's own: for a
            # flag given in both, the engine's parser takes the later one.
            given["engine_args"] = [*spec.engine_args, *check_api_args(given["engine_args"])]
        merged = {**spec.to_dict(), **given}
        merged.pop("name")
        # The entry's replica range, as the catalog wrote it.
        low, high = merged.pop("min_replicas"), merged.pop("max_replicas")
        merged["replicas"] = show_replicas(low, high) if low is not None else None
        try:
            entry = CatalogEntry(**merged)
        except ValidationError as exc:
            raise InvalidRequest(
                f"invalid override for {name!r}: {validation_problems(exc)}"
            ) from None
        return entry.spec(name)


def parse_catalog(text: str, source: str) -> Catalog:
    """Parse and validate a whole catalog; any bad entry rejects the file."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog {source}: not valid TOML: {exc}") from None
    extra = set(data) - {"models"}
    if extra:
        raise CatalogError(
            f"catalog {source}: unknown top-level key(s) {', '.join(sorted(extra))}; "
            "models go in [models.NAME] tables"
        )
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise CatalogError(f"catalog {source}: `models` must be a table of [models.NAME] tables")
    specs: dict[str, ModelSpec] = {}
    for name, raw in models.items():
        if not NAME_RE.match(name):
            raise CatalogError(f"catalog {source}, entry {name!r}: a name is {NAME_RULE}")
        if not isinstance(raw, dict):
            raise CatalogError(f"catalog {source}, entry {name!r}: must be a table")
        try:
            specs[name] = CatalogEntry(**raw).spec(name)
        except ValidationError as exc:
            raise CatalogError(
                f"catalog {source}, entry {name!r}: {validation_problems(exc)}"
            ) from None
    return Catalog(source=source, specs=specs)


def load_catalog(path: Path | None = None, *, allow_test_engine: bool = False) -> Catalog:
    """The catalog at `path`, or the packaged default one.

    The test engine answers with made-up text: a catalog that names it is refused
    unless the cluster is a test cluster (`allow_test_engine`).
    """
    if path is None:
        text = resources.files("nebula").joinpath("catalog.toml").read_text(encoding="utf-8")
        catalog = parse_catalog(text, "the default catalog")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {path}: {exc.strerror}") from None
        catalog = parse_catalog(text, str(path))
    fake = sorted(name for name, spec in catalog.items() if spec.engine == TEST_ENGINE)
    if fake and not allow_test_engine:
        raise CatalogError(
            f'catalog {catalog.source}: {", ".join(fake)} use engine = "{TEST_ENGINE}", '
            'Nebula\'s test engine, which answers with made-up text; use engine = "vllm", '
            "or set NEBULA_ALLOW_TEST_ENGINE=true on a test cluster"
        )
    return catalog

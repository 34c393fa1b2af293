"""Settings: `NEBULA_*` environment variables over an optional TOML file over defaults.

The file is the one `NEBULA_CONFIG` names, else the first of
`./nebula.toml`, `~/.config/nebula/nebula.toml`, `/etc/nebula/nebula.toml`
that exists. Keys in the file are the field names below (`redis_url = ...`).
Every field is validated on load; a bad value is a `ConfigError` that names the
field, the value's source and what is expected, never a traceback.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from nebula.connection import is_sentinel, parse_sentinel
from nebula.durations import parse_keep_alive
from nebula.errors import ConfigError, InvalidRequest, validation_problems
from nebula.load_settings import LoadSettings
from nebula.names import NAME_RE, NAME_RULE
from nebula.routing_settings import RoutingSettings
from nebula.security_settings import SecuritySettings

CONFIG_CANDIDATES = (
    Path("nebula.toml"),
    Path("~/.config/nebula/nebula.toml").expanduser(),
    Path("/etc/nebula/nebula.toml"),
)


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(a URL that does not parse)"
    if password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def config_file() -> Path | None:
    """The config file in force, or None."""
    named = os.environ.get("NEBULA_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"NEBULA_CONFIG names {path}, which is not a readable file")
        return path
    return next((p for p in CONFIG_CANDIDATES if p.is_file()), None)


class Settings(RoutingSettings, SecuritySettings, LoadSettings):
    """Nebula's settings; each field is documented where it is declared (the routing
    policy's in `nebula.routing_settings`, overload's in `nebula.load_settings`)."""

    model_config = SettingsConfigDict(env_prefix="NEBULA_", extra="forbid", enable_decoding=False)

    redis_url: str = Field(
        "redis://127.0.0.1:6380/0",
        description="Redis holding all of Nebula's state: redis://, rediss:// (TLS), unix://, "
        "or redis+sentinel://HOST:26379,HOST:26379,.../MASTER_NAME[/DB] (rediss+sentinel:// "
        "with TLS) to follow the master that Sentinel names through failovers.",
    )
    redis_sentinel_password: str = Field(
        "",
        description="The Sentinels' own password (requirepass in sentinel.conf), when they "
        "have one; the master's goes in redis_url.",
    )
    node_id: str = Field(
        default_factory=socket.gethostname,
        description="This machine's node id in the cluster; defaults to the host name.",
    )
    heartbeat_interval_s: float = Field(
        2.0, gt=0, description="Seconds between a node agent's heartbeats."
    )
    node_ttl_s: float = Field(
        8.0,
        gt=0,
        description="Heartbeat TTL: a node silent this long is dead (3-5 heartbeats), and "
        "its endpoints are withdrawn with it. Also the scheduler's grace after an outage or "
        "a new leader, and how long a router merges (never blanks) its table after one.",
    )
    agent_restart_allowance_s: float = Field(
        3.0,
        ge=0,
        description="Time an agent restart may take (supervisord restarts it at once; about "
        "1-2 s measured): node_ttl_s must cover it plus a heartbeat, so that a restarted "
        "agent is never taken for a dead node.",
    )
    scheduler_interval_s: float = Field(
        2.0, gt=0, description="Seconds between reconcile passes when nothing wakes the scheduler."
    )
    max_replacements: int = Field(
        3,
        ge=0,
        description="Failed replicas of one request replaced before giving up; the request "
        "is Failed only when no replica of it runs.",
    )
    replacement_backoff_s: float = Field(
        5.0,
        ge=0,
        description="Wait before replacing a failed replica; doubles with each failure "
        "(at most 300 s).",
    )
    leader_ttl_s: float = Field(
        6.0, gt=0, description="Scheduler leader lease; a dead leader is replaced after this."
    )
    memory_ceiling: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Most of a GPU's memory (or a CPU node's RAM) that placements may take.",
    )
    catalog_path: Path | None = Field(
        None, description="Model catalog TOML; the packaged default catalog when unset."
    )
    event_history: int = Field(
        100, ge=1, description="Events kept per model request (older ones are trimmed)."
    )
    engine_port_min: int = Field(
        8100, ge=1024, le=65535, description="Lowest port this node gives to an engine."
    )
    engine_port_max: int = Field(
        8199, ge=1024, le=65535, description="Highest port this node gives to an engine."
    )
    state_dir: Path = Field(
        Path("var"), description="Folder for this process's files (logs, engine configs, data)."
    )
    log_level: str = Field("INFO", description="Python log level: DEBUG, INFO, WARNING, ERROR.")

    # Node (agent and engines).
    node_address: str = Field(
        "127.0.0.1", description="This node's address: engines listen on it, routers reach them."
    )
    models_dir: Path = Field(
        Path("~/.cache/nebula/models"),
        description="Where `nebula models prepare` puts models, and engines find them.",
    )
    probe_interval_s: float = Field(
        1.0, gt=0, description="Seconds between engine health probes (and convergence passes)."
    )
    drain_timeout_s: float = Field(
        600.0,
        ge=0,
        description="Longest wait for an engine's requests to finish on unload (a catalog "
        "entry or the unload may set another); as long as first_byte_timeout_s, so that any "
        "answer the router waits for can finish.",
    )
    max_restarts: int = Field(
        3, ge=0, description="Engine crashes tolerated before its placement is marked Failed."
    )
    restart_decay_s: float = Field(
        600.0,
        gt=0,
        description="An engine healthy this long has its crash count reset to 0.",
    )
    engine_start_timeout_s: float = Field(
        900.0, gt=0, description="Longest wait for a new engine to answer its health probe."
    )
    engine_python: str = Field(
        "", description="Python that runs engines (with vLLM installed); this one when empty."
    )
    legacy_endpoints: bool = Field(
        False,
        description="Agents also write endpoints as before the change feed, for "
        "routers not yet upgraded (docs/operations.md, Upgrades).",
    )
    allow_test_engine: bool = Field(
        False,
        description='Accept catalog entries with engine = "test" (Nebula\'s own fake engine, '
        "for test clusters); never on a cluster that serves users.",
    )
    cpu_kvcache_gib: float = Field(
        1.0, gt=0, description="KV cache per engine on CPU nodes (VLLM_CPU_KVCACHE_SPACE)."
    )

    # Metrics.
    metrics_address: str = Field(
        "127.0.0.1",
        description="Address the scheduler's and agent's /metrics listen on and advertise.",
    )
    scheduler_metrics_port: int = Field(
        9180, ge=0, le=65535, description="The scheduler's /metrics port (0: any free port)."
    )
    agent_metrics_port: int = Field(
        9181, ge=0, le=65535, description="The node agent's /metrics port (0: any free port)."
    )

    # Router.
    router_host: str = Field("127.0.0.1", description="Address the router listens on.")
    router_port: int = Field(
        8080,
        ge=0,
        le=65535,
        description="Port for /v1, /admin, /metrics (0: a free one, written to router_port_file).",
    )
    router_port_file: Path | None = Field(
        None,
        description="Write the router's port here once it is bound (for whatever started "
        "it on port 0: a supervisor, a test).",
    )
    router_workers: int = Field(1, ge=1, le=64, description="Router processes sharing the port.")
    router_drain_s: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, how long in-flight requests get to finish."
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Client keys for /v1 (comma-separated in the environment); more can be "
        "created through the admin API. With none at all, /v1 is open on loopback only.",
    )
    admin_key: str = Field(
        "", description="Key for /admin; without one, /admin is open on loopback only."
    )
    admin_read_keys: list[str] = Field(
        default_factory=list,
        description="Read-only keys for GET /admin/... (cluster, models, nodes, catalog, "
        "Prometheus' discovery at /admin/sd); comma-separated in the environment.",
    )
    engine_api_key: str = Field(
        "",
        description="Internal key the engines require; the router adds it, clients never see it.",
    )
    trusted_network: bool = Field(
        False, description="Allow an open router (no keys) on a non-loopback address."
    )
    body_limit_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body the router accepts."
    )
    connect_timeout_s: float = Field(3.0, gt=0, description="Connecting to an engine.")
    first_byte_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Waiting for an engine's response headers (a whole answer when not streamed).",
    )
    idle_read_timeout_s: float = Field(
        120.0, gt=0, description="Most silence between two chunks of an engine's answer."
    )
    max_retries: int = Field(
        2, ge=0, le=10, description="Other replicas tried when one fails before the first byte."
    )
    routing_refresh_s: float = Field(
        1.0, gt=0, description="Routing table refresh when no change event arrives."
    )
    health_max_table_age_s: float = Field(
        60.0,
        gt=0,
        description="/health fails (503) when the routing table is older than this "
        "(Redis away that long): the router still serves, but a load balancer should know.",
    )
    default_rate_per_s: float | None = Field(
        None, gt=0, description="Requests per second per client key, unless the key sets its own."
    )

    # Elasticity: models loaded on their first request, unloaded when idle.
    on_demand: bool = Field(
        False, description="Load a catalog model on its first /v1 request (shell/run: on)."
    )
    keep_alive: str = Field(
        "5m", description='Idle time before an on-demand load unloads ("10m", 0, "never").'
    )
    hold_timeout_s: float = Field(
        600.0, gt=0, description="Longest a request waits for its model to load (then 503)."
    )
    hold_queue_limit: int = Field(
        64, ge=1, description="Requests one router process holds per loading model (then 429)."
    )
    hold_keepalive_s: float = Field(
        10.0, gt=0, description="A held stream gets an SSE comment this often while it waits."
    )
    usage_flush_s: float = Field(
        1.0, gt=0, le=30, description="How often routers record each model's last use."
    )

    @field_validator("keep_alive")
    @classmethod
    def _check_keep_alive(cls, value: str) -> str:
        try:
            parse_keep_alive(value)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        # Messages show the URL without its password: they end up in logs and terminals.
        shown = redact(value)
        if is_sentinel(value):
            try:
                parse_sentinel(value)
            except ValueError as exc:
                raise ValueError(f"{shown!r} {exc}") from None
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - parsing the port is part of the check
        except ValueError as exc:
            raise ValueError(f"{shown!r} is not a valid URL ({exc})") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"{shown!r} is not a Redis URL; use redis://HOST:PORT/DB, rediss://..., "
                "unix:///path/to/redis.sock or redis+sentinel://HOST:26379,.../MASTER_NAME "
                "(rediss+sentinel:// for TLS)"
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"{shown!r} has no host; use redis://HOST:PORT/DB")
        return value

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, value: str) -> str:
        # It names Redis keys, a folder and supervisord's files.
        if not NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a node id: use {NAME_RULE}")
        return value

    @field_validator("api_keys", "admin_read_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("models_dir", "state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Daemons run from supervisord's folder, not the caller's: pin paths now.
        return value.expanduser().absolute()

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"{value!r} is not a log level; use DEBUG, INFO, WARNING or ERROR")
        return level

    @model_validator(mode="after")
    def _check_ranges(self) -> Settings:
        if self.engine_port_min > self.engine_port_max:
            raise ValueError(
                f"engine_port_min {self.engine_port_min} is above engine_port_max "
                f"{self.engine_port_max}"
            )
        if self.node_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"node_ttl_s {self.node_ttl_s} must exceed heartbeat_interval_s "
                f"{self.heartbeat_interval_s} (3 to 5 times it is usual)"
            )
        room = self.heartbeat_interval_s + self.agent_restart_allowance_s
        if self.node_ttl_s < room:
            raise ValueError(
                f"node_ttl_s {self.node_ttl_s:g} leaves no room for an agent restart: it "
                f"must be at least heartbeat_interval_s + agent_restart_allowance_s = "
                f"{room:g}, or a restarting agent's node is declared dead and its engines "
                "replaced"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and config file, or a `ConfigError` that says why not."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        path = config_file()
        where = f" (environment, or {path})" if path else " (environment)"
        problems = validation_problems(exc, "settings")
        raise ConfigError(f"invalid settings{where}: {problems}") from None
    except ValueError as exc:  # a TOML file that does not parse
        raise ConfigError(f"cannot read config file {config_file()}: {exc}") from None

"""The settings of tenants and transport security: a part of `nebula.settings.Settings`
(which inherits these fields, with its prefix, sources and validation)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings


class SecuritySettings(BaseSettings):
    """Usage accounting, TLS and who may read /metrics (docs/operations.md, "Tenants"
    and "TLS")."""

    usage_retention_days: int = Field(
        400, ge=1, le=3660, description="Days each day's token usage per key is kept in Redis."
    )
    metrics_require_key: bool = Field(
        False,
        description="The router's /metrics needs the admin key or a read-only key "
        "(Prometheus: `authorization: {credentials: KEY}`); off: open, as Prometheus expects.",
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain: the router serves HTTPS with it (reloaded on "
        "SIGHUP). Needs tls_key_file.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    redis_tls_ca_file: Path | None = Field(
        None,
        description="CA bundle that signed Redis's (and the Sentinels') certificates, for "
        "rediss:// and rediss+sentinel:// URLs; unset: the system's CAs.",
    )

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both, or neither")
        for path in (self.tls_cert_file, self.tls_key_file, self.redis_tls_ca_file):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a readable file")
        return self

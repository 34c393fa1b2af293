"""Serving a daemon's Prometheus metrics, and keeping it discoverable.

Every Nebula process exposes `nebula_*` metrics on /metrics and advertises the
address in Redis (`nebula:metrics-targets`), refreshed like a heartbeat, so the
router's HTTP service-discovery endpoint can hand Prometheus every process and
every engine as they come and go.
"""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from nebula.errors import ConfigError
from nebula.loops import every
from nebula.store import State

log = logging.getLogger(__name__)


def serve_metrics(address: str, port: int, setting: str, what: str) -> str:
    """Start /metrics in a thread; HOST:PORT it listens on (`port` 0: any free one)."""
    try:
        server, _ = start_http_server(port, addr=address)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {address}:{port} ({exc.strerror}); set {setting} "
            "(0 picks a free port)"
        ) from None
    listening = f"{address}:{server.server_port}"
    log.info("%s metrics on http://%s/metrics", what, listening)
    return listening


async def advertise(state: State, kind: str, ident: str, address: str, interval_s: float) -> None:
    """Keep this process's /metrics address in Redis while it runs (discovery is a
    convenience: nothing it meets takes its daemon down)."""

    async def register() -> None:
        await state.targets.register(kind, ident, address, ttl_s=3 * interval_s)

    await every("metrics advertisement", interval_s, register)

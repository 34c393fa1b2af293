"""What is reachable beyond this machine, and the keys that close it.

The rule is one line: nothing answers beyond loopback without a key. Routers
check it at every request (see router/auth.py), nodes check it at start: an
engine listening on a routable address with no internal key would serve
anyone who finds its port (vLLM's `--api-key` guards only `/v1`, so even
with a key its other routes stay open; engine ports belong behind a firewall
that lets only routers in, see docs/operations.md).

When no engine key is configured, the node makes one and keeps it in
`state_dir/engine.key` (mode 0600); a router on the same machine with the
same state_dir reads the same file, which is how the single-machine stack
works with no key configured at all.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

from nebula.errors import ConfigError
from nebula.settings import Settings
from nebula.store import State

KEY_FILE = "engine.key"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_file(settings: Settings) -> Path:
    return settings.state_dir / KEY_FILE


def engine_key(settings: Settings, *, create: bool = True) -> str:
    """The engines' internal key: the configured one, else the kept one, made on first use
    (or "" when there is none and `create` is false: a router never makes one)."""
    if settings.engine_api_key:
        return settings.engine_api_key
    path = key_file(settings)
    try:
        return _read(path)
    except FileNotFoundError:
        if not create:
            return ""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _read(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return _read(path)


def _read(path: Path) -> str:
    key = path.read_text().strip()
    if not key:
        raise ConfigError(f"{path} is empty; delete it to make a new engine key")
    return key


def node_engine_key(settings: Settings) -> str:
    """The key this node's engines will require; refuses an open engine beyond loopback."""
    if not settings.engine_api_key and not is_loopback(settings.node_address):
        raise ConfigError(
            f"node_address {settings.node_address} is reachable beyond this machine and no "
            "engine key is set: set NEBULA_ENGINE_API_KEY (the same on every node and router) "
            "so that only routers can use the engines"
        )
    return engine_key(settings)


async def check_exposure(settings: Settings) -> None:
    """Refuse to serve an open router beyond loopback unless told the network is trusted."""
    if is_loopback(settings.router_host) or settings.trusted_network:
        return
    state = State.of(settings)
    try:
        stored = await state.api_keys.all()
    finally:
        await state.close()
    missing = []
    if not settings.api_keys and not stored:
        missing.append("no API keys for /v1 (NEBULA_API_KEYS, or POST /admin/keys)")
    if not settings.admin_key:
        missing.append("no admin key for /admin (NEBULA_ADMIN_KEY)")
    if missing:
        raise ConfigError(
            f"refusing to listen on {settings.router_host} with {' and '.join(missing)}; "
            "set the keys, listen on 127.0.0.1, or set NEBULA_TRUSTED_NETWORK=true"
        )

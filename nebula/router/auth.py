"""Client keys for /v1; the admin key and read-only keys for /admin.

Keys are compared by their SHA-256 digest (configured keys are hashed at
start, stored keys are stored hashed), and never logged or stored in Redis. A
client's key does stay in this process's memory, in plain text, as the key of a
bounded cache of digests (so that each is hashed once, not per request): a
memory dump of a router shows recent keys, as it would show the requests.

Fail closed: with no key at all, /v1 and /admin are open only on a router
that listens on loopback (or is told its network is trusted). The check is
made at every request against the keys known at that moment, so deleting
the last stored key closes a router that listens beyond loopback instead of
opening it. An open router refuses what a web page could have sent
(router/origin.py).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from nebula.models import ApiKey, digest
from nebula.router import origin


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


DIGEST_CACHE = 4096


class KeyRing:
    """Who may call /v1 and /admin."""

    def __init__(
        self,
        configured: list[str],
        admin_key: str,
        default_rate: float | None,
        *,
        open_allowed: bool = True,
        read_keys: list[str] | None = None,
        loopback: bool = True,
    ) -> None:
        self.configured = {
            digest(k): ApiKey(name=f"configured-{i}", digest=digest(k), rate_per_s=default_rate)
            for i, k in enumerate(configured)
        }
        self._admin = digest(admin_key) if admin_key else ""
        self._readers = frozenset(digest(k) for k in read_keys or ())
        # Whether no key at all may mean "open": only on loopback or a trusted network.
        self.open_allowed = open_allowed
        self.loopback = loopback  # listens on loopback only (see router/origin.py)
        # token -> digest, so the hot path hashes each client's key once, not per request.
        self._digests: dict[str, str] = {}
        self.default_rate = default_rate

    def client(self, token: str | None, stored: dict[str, ApiKey]) -> ApiKey | bool | None:
        """The caller's key; True when /v1 is open (no keys, and allowed); None when refused."""
        if not self.configured and not stored:
            return True if self.open_allowed else None
        if token is None:
            return None
        hashed = self._digests.get(token)
        if hashed is None:
            if len(self._digests) >= DIGEST_CACHE:
                self._digests.clear()  # bounded: a flood of bad keys cannot grow it
            hashed = self._digests[token] = digest(token)
        return self.configured.get(hashed) or stored.get(hashed)

    def foreign_caller(self, request: web.Request) -> str | None:
        """On an open router: why the request looks sent by a web page elsewhere."""
        return origin.foreign(request.headers, loopback_only=self.loopback)

    @property
    def admin_open(self) -> bool:
        return not self._admin and self.open_allowed

    def admin(self, token: str | None, *, write: bool = True) -> bool:
        """May `token` call an admin route (a read-only one when not `write`)?"""
        if self.admin_open:
            return True
        if token is None:
            return False
        hashed = digest(token)
        if self._admin and hmac.compare_digest(hashed, self._admin):
            return True
        return not write and any(hmac.compare_digest(hashed, r) for r in self._readers)

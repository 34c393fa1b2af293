"""Client keys for /v1, the admin key for /admin, and per-key request rates.

Keys are compared by their SHA-256 digest (configured keys are hashed at
start, stored keys are stored hashed), so no plaintext key is kept past start
and none is ever logged.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from nebula.models import ApiKey
from nebula.state import digest


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: `rate` requests per second, bursts up to max(1, rate)."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str, rate: float, now: float | None = None) -> float:
        """0 if the request may go now, else the seconds until it could."""
        now = time.monotonic() if now is None else now
        burst = max(1.0, rate)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=burst, at=now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate


DIGEST_CACHE = 4096


class Keys:
    """Who may call /v1 and /admin."""

    def __init__(self, configured: list[str], admin_key: str, default_rate: float | None) -> None:
        self.configured = {
            digest(k): ApiKey(name=f"configured-{i}", digest=digest(k), rate_per_s=default_rate)
            for i, k in enumerate(configured)
        }
        self._admin = digest(admin_key) if admin_key else ""
        # token -> digest, so the hot path hashes each client's key once, not per request.
        self._digests: dict[str, str] = {}
        self.default_rate = default_rate

    def client(self, token: str | None, stored: dict[str, ApiKey]) -> ApiKey | bool | None:
        """The caller's key; True when /v1 is open (no keys at all); None when refused."""
        if not self.configured and not stored:
            return True
        if token is None:
            return None
        hashed = self._digests.get(token)
        if hashed is None:
            if len(self._digests) >= DIGEST_CACHE:
                self._digests.clear()  # bounded: a flood of bad keys cannot grow it
            hashed = self._digests[token] = digest(token)
        return self.configured.get(hashed) or stored.get(hashed)

    @property
    def admin_open(self) -> bool:
        return not self._admin

    def admin(self, token: str | None) -> bool:
        if not self._admin:
            return True
        return token is not None and hmac.compare_digest(digest(token), self._admin)

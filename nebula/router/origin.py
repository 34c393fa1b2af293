"""What keeps a web page from driving an open router (no keys, on loopback).

A page in the operator's browser can send requests to 127.0.0.1: a form POST
(`text/plain`, no preflight) changes state; with DNS rebinding (the page's own
name made to resolve to 127.0.0.1), it can read the answers too. Ollama's
CVE-2024-28224 was this hole. So, while a router is open because it listens on
loopback, a request is refused when

- its `Host` is not a loopback name (a rebound name is not: the browser sends
  the page's own name), or
- it carries an `Origin` that is not a loopback origin (a page elsewhere);

and every admin POST takes only `application/json`, which no page can send
to another origin without a CORS preflight, which the router never grants
(nor can it send DELETE). A router open on a trusted network (`trusted_network`) cannot
check `Host` (its clients use its network name), so it refuses every foreign
`Origin` only.
"""

from __future__ import annotations

from collections.abc import Mapping

from nebula.exposure import is_loopback


def hostname(host: str) -> str:
    """The name or address of a `Host` header or an origin's authority (no port)."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8080
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def loopback_origin(origin: str) -> bool:
    scheme, sep, authority = origin.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return False  # "null" (a sandboxed page, a file) among others
    return is_loopback(hostname(authority.partition("/")[0]))


def foreign(headers: Mapping[str, str], *, loopback_only: bool) -> str | None:
    """Why a request to an open router looks sent by a web page elsewhere; None if not."""
    host = headers.get("Host")
    if loopback_only and host is not None and not is_loopback(hostname(host)):
        return (
            f"this router is open (no keys) on loopback, and Host {host[:80]!r} is not a "
            "loopback name: use http://127.0.0.1 or http://localhost, or set keys"
        )
    origin = headers.get("Origin")
    if origin is not None and not loopback_origin(origin):
        return (
            f"this router is open (no keys), and requests from web pages ({origin[:80]!r}) "
            "are refused; set keys (NEBULA_API_KEYS, NEBULA_ADMIN_KEY) to use it from a page"
        )
    return None


def json_content(headers: Mapping[str, str]) -> bool:
    """Is the body declared JSON? (`application/json`, parameters allowed.)"""
    kind = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    return kind == "application/json"

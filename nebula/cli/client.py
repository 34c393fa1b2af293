"""The admin API client used by nebula-cli and nebula-shell: one write path.

Synchronous and standard-library only (urllib): the CLI starts fast and a
terminal waits on one answer at a time anyway.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from nebula.errors import NebulaError


class ClientError(NebulaError):
    """The API answered with an error (status and message from its body)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(NebulaError):
    """Nothing answers at the router's URL."""

    status = 0


@dataclass
class Target:
    url: str
    admin_key: str
    api_key: str

    @classmethod
    def from_environment(cls, url: str | None = None) -> Target:
        """URL, keys: flags, then NEBULA_URL / NEBULA_ADMIN_KEY / NEBULA_API_KEY, then settings."""
        from nebula.settings import load_settings

        settings = None
        if not (url or os.environ.get("NEBULA_URL")) or not os.environ.get("NEBULA_ADMIN_KEY"):
            try:
                settings = load_settings()
            except NebulaError:
                settings = None
        if not url:
            url = os.environ.get("NEBULA_URL")
        if not url:
            host = settings.router_host if settings else "127.0.0.1"
            port = settings.router_port if settings else 8080
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        admin = os.environ.get("NEBULA_ADMIN_KEY") or (settings.admin_key if settings else "")
        api = os.environ.get("NEBULA_API_KEY") or (
            settings.api_keys[0] if settings and settings.api_keys else ""
        )
        return cls(url=url.rstrip("/"), admin_key=admin, api_key=api)


class AdminClient:
    def __init__(self, target: Target, timeout: float = 15.0) -> None:
        self.target = target
        self.timeout = timeout

    def _open(self, method: str, path: str, body: Any = None, key: str = "") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.target.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                raw = exc.read()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace").strip() or exc.reason
            raise ClientError(str(message), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(
                f"cannot reach Nebula at {self.target.url} ({reason}); is the stack running "
                "(shell/run)? Set --url or NEBULA_URL"
            ) from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        with self._open(method, path, body, self.target.admin_key) as r:
            return json.loads(r.read() or b"{}")

    def cluster(self) -> dict[str, Any]:
        return dict(self.call("GET", "/admin/cluster"))

    def models(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/admin/models")["models"])

    def load(self, model: str, replicas: int | str | None, **overrides: Any) -> dict[str, Any]:
        """Load `model`: `replicas` a count, a range "MIN..MAX", or None (the catalog's)."""
        body: dict[str, Any] = {"model": model}
        if replicas is not None:
            body["replicas"] = replicas
        body.update({k: v for k, v in overrides.items() if v is not None})
        return dict(self.call("POST", "/admin/models", body))

    def show(self, ref: str) -> dict[str, Any]:
        return dict(self.call("GET", "/admin/models/" + urllib.parse.quote(ref, safe="")))

    def unload(self, ref: str, drain_timeout_s: float | None = None) -> dict[str, Any]:
        path = "/admin/models/" + urllib.parse.quote(ref, safe="")
        if drain_timeout_s is not None:
            path += f"?drain_timeout_s={drain_timeout_s:g}"
        return dict(self.call("DELETE", path))

    def pin(self, ref: str, pinned: bool, keep_alive: str | None = None) -> dict[str, Any]:
        path = "/admin/models/" + urllib.parse.quote(ref, safe="")
        if pinned:
            return dict(self.call("POST", path + "/pin"))
        body = {"keep_alive": keep_alive} if keep_alive else {}
        return dict(self.call("POST", path + "/unpin", body))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/admin/nodes")["nodes"])

    def node_action(self, node: str, action: str) -> dict[str, Any]:
        path = f"/admin/nodes/{urllib.parse.quote(node, safe='')}/{action}"
        return dict(self.call("POST", path))

    def api_keys(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/admin/keys")["keys"])

    def create_key(self, fields: dict[str, Any]) -> dict[str, Any]:
        return dict(self.call("POST", "/admin/keys", fields))

    def show_key(self, name: str) -> dict[str, Any]:
        return dict(self.call("GET", "/admin/keys/" + urllib.parse.quote(name, safe="")))

    def delete_key(self, name: str) -> dict[str, Any]:
        return dict(self.call("DELETE", "/admin/keys/" + urllib.parse.quote(name, safe="")))

    def usage(self, days: int, key: str | None, model: str | None) -> dict[str, Any]:
        query = {
            "days": str(days),
            **({"key": key} if key else {}),
            **({"model": model} if model else {}),
        }
        return dict(self.call("GET", "/admin/usage?" + urllib.parse.urlencode(query)))

    def catalog(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/admin/catalog")["models"])

    def chat_stream(
        self, model: str, messages: list[dict[str, str]], max_tokens: int | None = None
    ) -> Generator[str, None, None]:
        """The answer's text as it streams from the router (SSE); `close()` it to hang up."""
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
        if max_tokens:
            body["max_tokens"] = max_tokens
        with self._open("POST", "/v1/chat/completions", body, self.target.api_key) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ClientError(event["error"].get("message", "the stream broke"), 502)
                for choice in event.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text

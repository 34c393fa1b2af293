"""Errors in OpenAI's shape: {"error": {"message", "type", "code"}}."""

from __future__ import annotations

import json

from aiohttp import web

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


def error_body(status: int, message: str, code: str | None = None) -> dict[str, object]:
    kind = TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code}}


def error(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(error_body(status, message, code)).encode(),
        content_type="application/json",
        headers=headers,
    )


def invalid_api_key() -> web.Response:
    return error(
        401, "missing or invalid API key; send Authorization: Bearer KEY", "invalid_api_key"
    )


def stream_error_event(message: str, code: str) -> bytes:
    """An SSE event that ends a broken stream: an error, never a made-up finish_reason."""
    return b"data: " + json.dumps(error_body(502, message, code)).encode() + b"\n\n"


# The most of an engine's own error text quoted in a wrapped error.
UPSTREAM_TEXT_LIMIT = 500


def upstream_error(status: int, data: bytes, headers: dict[str, str]) -> web.Response:
    """An engine's error answer, in OpenAI's shape whatever the engine sent.

    One already in that shape (vLLM's own) passes unchanged. Anything else (a plain
    text page, `{"detail": ...}`, HTML from something in between) is wrapped: a
    client error keeps its status, anything else becomes 502; the engine's text is
    quoted in the message."""
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return web.Response(status=status, body=data, headers=headers)
        detail = parsed.get("detail", parsed.get("message", err))
        text = detail if isinstance(detail, str) else json.dumps(detail if detail else parsed)
    else:
        text = data.decode("utf-8", "replace")
    text = " ".join(text.split())[:UPSTREAM_TEXT_LIMIT] or "(no text)"
    shown = status if 400 <= status < 500 else 502
    return error(shown, f"the replica answered HTTP {status}: {text}", "upstream_error")

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
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "code": code}}


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

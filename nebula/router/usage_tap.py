"""Reading the tokens an answer used from its `usage`, without parsing the answer.

vLLM puts `usage` last in a whole answer (chat, completion, embeddings), so it is
read from the answer's tail: an embeddings answer of hundreds of kB costs a
search from its end and a parse of a few dozen bytes. A stream carries `usage`
only when asked (`stream_options.include_usage`), in a chunk of its own with no
choices, just before `[DONE]`; the router asks for it on every stream
(`ask_for_usage`) and, when the client had not, removes that chunk on the way
back (`StreamTap`), so the client gets the stream it asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

USAGE = b'"usage"'
_decoder = json.JSONDecoder()
_decode = msgspec.json.Decoder().decode
# An SSE event held back while its end has not arrived, at most: past it the
# stream is not the SSE the router knows, and is passed on as it comes.
PARTIAL_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Tokens:
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def tokens_of(usage: object) -> Tokens | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int | None):
        return None
    return Tokens(max(0, prompt), max(0, completion or 0))


def from_answer(data: bytes) -> Tokens | None:
    """The `usage` of a whole JSON answer, read from its last `"usage"` on."""
    at = data.rfind(USAGE)
    if at < 0:
        return None
    brace = data.find(b"{", at)
    if brace < 0 or data[at + len(USAGE) : brace].strip() != b":":
        return None
    close = data.find(b"}", brace)
    if close > 0 and data.find(b"{", brace + 1, close) < 0:  # flat, as vLLM writes it
        try:
            return tokens_of(_decode(data[brace : close + 1]))
        except msgspec.DecodeError:
            pass
    try:
        usage, _ = _decoder.raw_decode(data[brace:].decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return tokens_of(usage)


def ask_for_usage(body: bytes, payload: dict[str, Any]) -> bytes | None:
    """The body with `stream_options.include_usage` on, or None when the client asked
    for usage itself (then its stream keeps the usage chunk)."""
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    if options is None and body.lstrip().startswith(b"{"):
        # The same bytes, one field in front: no second serialisation of a long prompt.
        front = body.index(b"{") + 1
        rest = body[front:].lstrip()
        comma = b"" if rest.startswith(b"}") else b","
        return b'{"stream_options":{"include_usage":true}' + comma + rest
    given = options if isinstance(options, dict) else {}
    return json.dumps({**payload, "stream_options": {**given, "include_usage": True}}).encode()


class StreamTap:
    """Watches a stream's events for `usage`; with `strip`, drops the usage-only chunk.

    `feed` returns what to pass on now: whole events only (an event whose end has
    not come yet waits for it, which costs the client nothing: half an event is
    of no use to it). `final` is set once the usage-only chunk has passed.
    """

    def __init__(self, *, strip: bool) -> None:
        self.strip = strip
        self.tokens: Tokens | None = None
        self.final = False
        self.events = 0  # events passed on: about one token each (for an estimate)
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            if len(data) > PARTIAL_LIMIT:
                self._partial = b""
                return data
            self._partial = data
            return b""
        whole, self._partial = data[: cut + 2], data[cut + 2 :]
        self.events += whole.count(b"\n\n")
        if USAGE not in whole:
            return whole
        return self._read(whole)

    def flush(self) -> bytes:
        """What is left at the stream's end (an event that never ended)."""
        rest, self._partial = self._partial, b""
        return rest

    def _read(self, whole: bytes) -> bytes:
        kept = []
        for event in whole.split(b"\n\n")[:-1]:
            # Read every usage event (its tokens count); drop the usage-only one if asked.
            if USAGE in event and self._usage_only(event) and self.strip:
                continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def _usage_only(self, event: bytes) -> bool:
        """Take the event's usage; True when it is the usage-only chunk."""
        data = event.strip().removeprefix(b"data:").strip()
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):
            return False
        if not isinstance(payload, dict):
            return False
        tokens = tokens_of(payload.get("usage"))
        if tokens is not None:
            self.tokens = tokens  # continuous usage stats: the last one counts
        only = tokens is not None and payload.get("choices") == []
        self.final = self.final or only
        return only

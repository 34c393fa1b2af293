"""A prompt's prefix keys, for cache-aware routing (`prefix.py`): what a router
can know of the KV-cache blocks an engine will keep for a prompt, without its
tokens. Pure: no I/O."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Messages that set the conversation up rather than start it.
PREAMBLE_ROLES = ("system", "developer")


def _segments(payload: dict[str, Any]) -> Iterator[tuple[str, bool]]:
    """The prompt as text, a message at a time (a completion's prompt: one piece),
    each with whether it is a user's, the model's or a tool's (not a preamble)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):  # content parts: take the text ones
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            role = message.get("role", "")
            yield f"{role}:{content}\n", role not in PREAMBLE_ROLES
        return
    prompt = payload.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else None
    if isinstance(prompt, str):
        yield prompt, False


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt's keys (see `chain`), the offset in characters of each cut, and its
    anchor: the key that tells this conversation from others on the same preamble,
    in every turn (the end of its first message past the system prompt; the last
    key where there is none)."""

    keys: list[int]
    ends: list[int]
    anchor: int
    taggable: bool = True  # the client set no session_id of its own (see `with_session`)

    @property
    def tell(self) -> int:
        return self.keys[self.anchor] if self.keys else 0


def chain(payload: dict[str, Any], chunk_chars: int, max_chars: int) -> Prompt:
    """The prompt's keys: at every `chunk_chars` characters and every message end,
    a 64-bit hash of all the text before that cut, up to `max_chars` characters
    (counted as bytes of UTF-8).

    Cuts sit at absolute offsets, so a prompt that extends another (the next
    turn) has all of its keys, in the same places. The hash is CRC-32 and
    Adler-32 of the text so far, side by side: both run on from one cut to the
    next in C at about 1 GB/s, where a cryptographic hash costs 2 us a cut here;
    a collision (about one in 2^64 pairs) costs a cache miss, never an answer.
    A leading system prompt is cut once and remembered (`_preamble`): every
    user of an app sends the same one."""
    keys: list[int] = []
    ends: list[int] = []
    anchor = -1
    cut = Cut(0, 0, 1)
    for text, opens in _segments(payload):
        if not keys and not opens and cut.offset == 0:
            cut, first = _preamble(text, chunk_chars, max_chars)
        else:
            cut, first = _cut(text.encode(), cut, chunk_chars, max_chars)
        keys += first.keys
        ends += first.ends
        if opens and anchor < 0 and first.whole:
            anchor = len(keys) - 1
        if cut.offset >= max_chars:
            break
    return Prompt(keys, ends, anchor, "session_id" not in payload)


@dataclass(frozen=True, slots=True)
class Cut:
    """Where hashing stands after a segment: its offset and both hashes so far."""

    offset: int
    crc: int
    adler: int


@dataclass(frozen=True, slots=True)
class Keys:
    """One segment's keys and cuts; `whole`: the segment ended before `max_chars`."""

    keys: list[int]
    ends: list[int]
    whole: bool


PREAMBLES = 256  # leading system prompts remembered (`_preamble`)
_preambles: dict[tuple[str, int, int], tuple[Cut, Keys]] = {}


def _preamble(text: str, chunk_chars: int, max_chars: int) -> tuple[Cut, Keys]:
    """`_cut` of a prompt's first segment, remembered: a long system prompt shared by
    every user is hashed once, not per request (a dict lookup by the text)."""
    known = _preambles.get((text, chunk_chars, max_chars))
    if known is None:
        if len(_preambles) >= PREAMBLES:
            _preambles.clear()  # bounded: many apps' prompts cost a re-hash, no growth
        known = _preambles[(text, chunk_chars, max_chars)] = _cut(
            text.encode(), Cut(0, 0, 1), chunk_chars, max_chars
        )
    return known


def _cut(text: bytes, at: Cut, chunk_chars: int, max_chars: int) -> tuple[Cut, Keys]:
    """A segment's keys, going on from `at`."""
    keys: list[int] = []
    ends: list[int] = []
    crc, adler, offset = at.crc, at.adler, at.offset
    crc32, adler32 = zlib.crc32, zlib.adler32
    data = memoryview(text)
    end = min(offset + len(data), max_chars)
    done = 0  # of the segment, hashed
    for cut in range((offset // chunk_chars + 1) * chunk_chars, end + 1, chunk_chars):
        piece = data[done : cut - offset]
        crc, adler = crc32(piece, crc), adler32(piece, adler)
        done = cut - offset
        keys.append(crc << 32 | adler)
        ends.append(cut)
    if offset + done < end:  # the segment's end (or max_chars), between two cuts
        piece = data[done : end - offset]
        crc, adler = crc32(piece, crc), adler32(piece, adler)
        keys.append(crc << 32 | adler)
        ends.append(end)
    return Cut(end, crc, adler), Keys(keys, ends, end == offset + len(data))


def with_session(body: bytes, session: str) -> bytes:
    """The request body with `session_id` set (vLLM names it in the KV-cache events
    of the request's blocks); unchanged where it is not a non-empty JSON object."""
    rest = body.lstrip()
    if not rest.startswith(b"{") or rest[1:].lstrip().startswith(b"}"):
        return body
    return b'{"session_id":' + json.dumps(session).encode() + b"," + rest[1:]

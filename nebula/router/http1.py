"""Reading an HTTP/1.1 response as its bytes arrive, for the router's upstream client
(`upstream.py`). Pure: no I/O.

Only what engines send is needed: a status line, headers, and a body framed by
Content-Length, by chunked transfer encoding (vLLM's streams), or by the
connection's close. Anything else is a `BadResponse`, and the connection is not
reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MAX_HEAD = 64 * 1024  # bytes of status line and headers, at most
MAX_CHUNK_LINE = 1024  # a chunk's size line, extensions included


class BadResponse(Exception):
    """The bytes are not an HTTP/1.1 response the router can read."""


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: dict[str, str]  # names in lower case
    keep_alive: bool


class Sink(Protocol):
    def on_head(self, head: Head) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_end(self) -> None: ...


# Where the parser stands.
HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, UNTIL_CLOSE, DONE = range(8)


class ResponseParser:
    """Feeds one response's head, body pieces and end to `sink`, as bytes arrive."""

    __slots__ = ("_buffer", "_left", "_state", "extra", "sink")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._state = HEAD
        self._buffer = b""
        self._left = 0  # body or chunk bytes still to come
        self.extra = False  # bytes came after the response's end (never reuse the connection)

    @property
    def done(self) -> bool:
        return self._state == DONE

    def feed(self, data: bytes) -> None:
        while data:
            state = self._state
            if state in (LENGTH, CHUNK_DATA):  # the hot path first
                data = self._data(data)
            elif state == HEAD:
                data = self._head(data)
            elif state == UNTIL_CLOSE:
                self.sink.on_body(data)
                return
            elif state == DONE:
                self.extra = True
                return
            else:
                data = self._chunk_line(data)

    def eof(self) -> None:
        """The connection closed: the end of a body read until close, else too soon."""
        if self._state == UNTIL_CLOSE:
            self._end()
        elif self._state != DONE:
            raise BadResponse("the connection closed before the response's end")

    def _head(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        at = buffer.find(b"\r\n\r\n")
        if at < 0:
            if len(buffer) > MAX_HEAD:
                raise BadResponse(f"response head over {MAX_HEAD} bytes")
            self._buffer = buffer
            return b""
        self._buffer = b""
        head = parse_head(buffer[:at])
        rest = buffer[at + 4 :]
        if 100 <= head.status < 200:
            return rest  # an interim response (100 Continue): the real one follows
        self.sink.on_head(head)
        length = head.headers.get("content-length")
        if "chunked" in head.headers.get("transfer-encoding", "").lower():
            self._state = CHUNK_SIZE
        elif head.status in (204, 304):
            self._end()
        elif length is not None:
            if not length.isdigit():
                raise BadResponse(f"bad Content-Length {length!r}")
            self._left = int(length)
            self._state = LENGTH
            if not self._left:
                self._end()
        else:
            self._state = UNTIL_CLOSE
        return rest

    def _data(self, data: bytes) -> bytes:
        left = self._left
        if len(data) <= left:
            self._left = left - len(data)
            self.sink.on_body(data)
            rest = b""
        else:
            self._left = 0
            self.sink.on_body(data[:left])
            rest = data[left:]
        if not self._left:
            if self._state == LENGTH:
                self._end()
            else:
                self._state = CHUNK_END
        return rest

    def _chunk_line(self, data: bytes) -> bytes:
        """A chunk's size line, the CRLF after its data, or a trailer line."""
        buffer = self._buffer + data if self._buffer else data
        at = buffer.find(b"\r\n")
        if at < 0:
            if len(buffer) > MAX_CHUNK_LINE:
                raise BadResponse("chunk size line too long")
            self._buffer = buffer
            return b""
        self._buffer = b""
        line, rest = buffer[:at], buffer[at + 2 :]
        state = self._state
        if state == CHUNK_END:
            if line:
                raise BadResponse("chunk data longer than its size")
            self._state = CHUNK_SIZE
        elif state == CHUNK_SIZE:
            size = line.split(b";", 1)[0].strip()
            try:
                self._left = int(size, 16)
            except ValueError:
                raise BadResponse(f"bad chunk size {size[:20]!r}") from None
            if self._left < 0:
                raise BadResponse(f"bad chunk size {size[:20]!r}")
            self._state = CHUNK_DATA if self._left else TRAILER
        elif not line:  # TRAILER: the empty line ends the message
            self._end()
        return rest

    def _end(self) -> None:
        self._state = DONE
        self.sink.on_end()


def parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise BadResponse(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadResponse(f"bad header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    # HTTP/1.1 keeps the connection unless told; 1.0 closes it unless told.
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    return Head(int(code), headers, keep_alive)

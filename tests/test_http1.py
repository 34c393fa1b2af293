"""Reading engines' HTTP/1.1 responses (router/http1.py, pure): whatever pieces
TCP delivers them in, the same head, body and end."""

from __future__ import annotations

import pytest

from nebula.router.http1 import BadResponse, Head, ResponseParser


class Recorder:
    def __init__(self) -> None:
        self.head: Head | None = None
        self.body = b""
        self.ends = 0

    def on_head(self, head: Head) -> None:
        assert self.head is None, "one head per response"
        self.head = head

    def on_body(self, data: bytes) -> None:
        assert self.head is not None and not self.ends
        self.body += data

    def on_end(self) -> None:
        self.ends += 1


def read(raw: bytes, split: int | None = None, *, closed: bool = False) -> tuple[Recorder, bool]:
    """`raw` fed whole, or in two pieces cut at `split`; (what was read, extra bytes)."""
    sink = Recorder()
    parser = ResponseParser(sink)
    pieces = [raw] if split is None else [raw[:split], raw[split:]]
    for piece in pieces:
        parser.feed(piece)
    if closed:
        parser.eof()
    return sink, parser.extra


SSE = b"data: {}\n\n"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n" % (len(SSE), SSE)
    + b"a;ext=1\r\n0123456789\r\n"
    + b"0\r\nX-Trailer: 1\r\n\r\n"
)
LENGTH = b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Request-Id: r1\r\n\r\n{"ok": true}'[:-1]


@pytest.mark.parametrize(
    ("raw", "body"), [(CHUNKED, SSE + b"0123456789"), (LENGTH, b'{"ok": true')]
)
def test_a_response_cut_anywhere_reads_the_same(raw: bytes, body: bytes) -> None:
    for split in range(len(raw) + 1):
        sink, extra = read(raw, split)
        assert sink.head is not None and sink.head.status == 200, split
        assert sink.body == body and sink.ends == 1 and not extra, split
        assert sink.head.keep_alive


def test_one_byte_at_a_time() -> None:
    sink = Recorder()
    parser = ResponseParser(sink)
    for i in range(len(CHUNKED)):
        parser.feed(CHUNKED[i : i + 1])
    assert sink.body == SSE + b"0123456789" and sink.ends == 1 and parser.done


def test_headers_are_read_in_lower_case() -> None:
    sink, _ = read(LENGTH)
    assert sink.head is not None and sink.head.headers["x-request-id"] == "r1"


def test_a_body_until_close_ends_with_the_connection_and_is_never_reused() -> None:
    sink, _ = read(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial", closed=True)
    assert sink.body == b"partial" and sink.ends == 1
    assert sink.head is not None and not sink.head.keep_alive


def test_http_1_0_closes_unless_told_to_keep_alive() -> None:
    closing, _ = read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    kept, _ = read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n")
    assert closing.head is not None and not closing.head.keep_alive
    assert kept.head is not None and kept.head.keep_alive


def test_an_interim_response_is_skipped_and_no_body_has_no_end_to_wait_for() -> None:
    sink, _ = read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert sink.head is not None and sink.head.status == 204 and sink.ends == 1


def test_bytes_after_the_end_are_flagged() -> None:
    _, extra = read(LENGTH + b"HTTP/1.1 200 OK\r\n")
    assert extra


def test_a_connection_closed_too_soon_is_an_error() -> None:
    with pytest.raises(BadResponse, match="before the response's end"):
        read(LENGTH[:-3], closed=True)
    with pytest.raises(BadResponse, match="before the response's end"):
        read(CHUNKED[:-5], closed=True)


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000,
    ],
)
def test_what_is_not_http_is_refused(raw: bytes) -> None:
    with pytest.raises(BadResponse):
        read(raw)

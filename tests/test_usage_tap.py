"""Reading `usage` from answers and streams (router/usage_tap.py, pure): wherever the
engine's chunks are cut, the client gets the same events minus the usage chunk
the router asked for, and the tokens are read once."""

from __future__ import annotations

import json
import random

from nebula.router.usage_tap import StreamTap, Tokens, ask_for_usage, from_answer

USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


STREAM = [
    event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
    event({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
    event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    event({"choices": [], "usage": USAGE}),
    b"data: [DONE]\n\n",
]


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` in random pieces, as TCP may deliver it."""
    pieces, at = [], 0
    while at < len(data):
        size = rng.randint(1, 40)
        pieces.append(data[at : at + size])
        at += size
    return pieces


def test_the_usage_chunk_is_removed_wherever_the_stream_is_cut() -> None:
    whole = b"".join(STREAM)
    wanted = b"".join(e for i, e in enumerate(STREAM) if i != 3)
    for seed in range(200):
        tap = StreamTap(strip=True)
        out = b"".join(tap.feed(piece) for piece in cut(whole, random.Random(seed))) + tap.flush()
        assert out == wanted, seed
        assert tap.tokens == Tokens(12, 3) and tap.final


def test_a_client_that_asked_for_usage_keeps_its_chunk() -> None:
    tap = StreamTap(strip=False)
    out = b"".join(tap.feed(e) for e in STREAM) + tap.flush()
    assert out == b"".join(STREAM)
    assert tap.tokens == Tokens(12, 3)


def test_continuous_usage_counts_the_last_one() -> None:
    tap = StreamTap(strip=False)
    running = {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}
    tap.feed(event({"choices": [{"index": 0, "delta": {"content": "a"}}], "usage": running}))
    assert tap.tokens == Tokens(12, 1) and not tap.final
    tap.feed(event({"choices": [], "usage": USAGE}))
    assert tap.tokens == Tokens(12, 3) and tap.final


def test_a_stream_that_is_not_sse_is_passed_on_not_held() -> None:
    tap = StreamTap(strip=True)
    blob = b"x" * (70 * 1024)  # no event boundary at all
    assert tap.feed(blob) == blob


def test_usage_is_read_from_a_whole_answers_tail() -> None:
    answer = json.dumps({"object": "list", "data": [{"embedding": [0.1] * 384}], "usage": USAGE})
    assert from_answer(answer.encode()) == Tokens(12, 3)
    embeddings = {"usage": {"prompt_tokens": 7, "total_tokens": 7}}
    assert from_answer(json.dumps(embeddings).encode()) == Tokens(7, 0)
    assert from_answer(b'{"choices": []}') is None
    assert from_answer(b'{"text": "the word \\"usage\\" in a reply"}') is None
    assert from_answer(b'{"usage": {"prompt_tokens": "many"}}') is None


def test_usage_is_asked_for_on_the_same_bytes() -> None:
    body = b'{"model": "m", "stream": true, "messages": []}'
    asked = ask_for_usage(body, json.loads(body))
    assert asked is not None and asked.endswith(body[1:])
    assert json.loads(asked)["stream_options"] == {"include_usage": True}
    own = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": True}}
    merged = ask_for_usage(json.dumps(own).encode(), own)
    assert merged is not None
    assert json.loads(merged)["stream_options"] == {
        "continuous_usage_stats": True,
        "include_usage": True,
    }
    already = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    assert ask_for_usage(json.dumps(already).encode(), already) is None

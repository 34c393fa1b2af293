"""What the test engine makes of a request's prompt: vLLM's validation (a 400 for
what vLLM refuses) and a prefix cache of chained block hashes, as vLLM keeps one."""

from __future__ import annotations

import hashlib
from typing import Any

CHARS_PER_TOKEN = 4  # the test engine's tokens (about English's)
BLOCK_CHARS = 64  # like vLLM's blocks of 16 tokens, in characters
CACHE_BLOCKS = 20_000


def invalid(body: dict[str, Any], chat: bool) -> str | None:
    """What vLLM would refuse with a 400 in a completion request, else None."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: a non-empty list of message objects is required"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return f"messages[{i}]: an object with a `role` string is required"
    elif not isinstance(body.get("prompt"), str | list):
        return "prompt: a string or a list is required"
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        return "max_tokens: a positive integer is required"
    return None


def prompt_text(body: dict[str, Any], chat: bool) -> str:
    if chat:
        return "".join(
            f"{m.get('role', '')}:{m.get('content', '')}\n"
            for m in body.get("messages") or []
            if isinstance(m, dict)
        )
    return str(body.get("prompt", ""))


def cached_prefix(
    cache: dict[str, None], text: str, capacity: int = CACHE_BLOCKS
) -> tuple[int, list[str], list[str]]:
    """Characters of `text`'s leading blocks already in `cache` (block hash -> None,
    oldest first); then all of `text` is cached, most recent last, the oldest evicted
    past `capacity` blocks. Returns the hit, the text's block hashes, and the block
    hashes evicted."""
    hit = 0
    chain = hashlib.blake2b(digest_size=8)
    keys = []
    for start in range(0, len(text) - len(text) % BLOCK_CHARS, BLOCK_CHARS):
        chain.update(text[start : start + BLOCK_CHARS].encode())
        keys.append(chain.hexdigest())
    for key in keys:
        if key not in cache:
            break
        hit += BLOCK_CHARS
    for key in reversed(keys):  # deepest first: a prefix outlives what extends it, as in vLLM
        cache.pop(key, None)
        cache[key] = None
    evicted = []
    while len(cache) > capacity:
        oldest = next(iter(cache))
        del cache[oldest]
        evicted.append(oldest)
    return hit, keys, evicted

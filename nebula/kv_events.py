"""vLLM's KV-cache events, as its ZMQ publisher sends them (`--kv-events-config`),
and where each engine of a node publishes them.

An engine with `enable_kv_cache_events` publishes, on a ZMQ PUB socket, one
multipart message per batch: the topic, an 8-byte big-endian sequence number,
and a msgpack array `[ts, events, data_parallel_rank]` whose events are maps
tagged by `type`: `BlockStored` (`block_hashes`, `parent_block_hash`,
`token_ids`, `block_size`, ..., `session_id`: the `session_id` of the request
that stored or reused the blocks), `BlockRemoved` (`block_hashes`) and
`AllBlocksCleared`. Hashes are bytes, or 64-bit ints with
`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`; either is only compared here. Fields
this module does not know are ignored, so a newer vLLM's events still read.

Each engine publishes on an IPC socket in a directory only its user can open
(the events carry the prompts' token ids): its node's agent subscribes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

TOPIC = b"kv"
# The sessions routers name their requests with (router/prefix.py: tag), at most
# this long; any other session (a client's own) is not followed.
ROUTER_SESSION_PREFIX = "nebula:"
MAX_SESSION_CHARS = 200


def is_router_session(session: str) -> bool:
    return session.startswith(ROUTER_SESSION_PREFIX) and len(session) <= MAX_SESSION_CHARS


@dataclass(frozen=True, slots=True)
class Stored:
    hashes: Sequence[Hashable]
    parent: Hashable | None
    session: str | None


@dataclass(frozen=True, slots=True)
class Removed:
    hashes: Sequence[Hashable]


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared


def socket_dir() -> Path:
    """Where this machine's engines publish: one directory per user, mode 0700."""
    return Path(tempfile.gettempdir()) / f"nebula-kv-{os.getuid()}"


def endpoint(placement_id: str) -> str:
    return f"ipc://{socket_dir() / placement_id}.ipc"


def engine_config(placement_id: str) -> str:
    """The value of vLLM's `--kv-events-config` for a placement's engine."""
    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": endpoint(placement_id),
            "topic": TOPIC.decode(),
        },
        separators=(",", ":"),
    )


def _hashable(value: Any) -> Hashable:
    return bytes(value) if isinstance(value, bytes | bytearray | list) else value


def decode(frames: Sequence[bytes]) -> list[Event]:
    """One published message (topic, sequence, payload) as events; [] for one this
    version cannot read."""
    if len(frames) != 3:
        return []
    try:
        batch = msgspec.msgpack.decode(frames[2])
        raw_events = batch[1]
    except (msgspec.DecodeError, IndexError, TypeError, KeyError):
        return []
    events: list[Event] = []
    for raw in raw_events if isinstance(raw_events, list) else ():
        if not isinstance(raw, dict):
            continue
        kind = raw.get("type")
        if kind == "BlockStored":
            parent = raw.get("parent_block_hash")
            session = raw.get("session_id")
            events.append(
                Stored(
                    [_hashable(h) for h in raw.get("block_hashes") or []],
                    None if parent is None else _hashable(parent),
                    session if isinstance(session, str) else None,
                )
            )
        elif kind == "BlockRemoved":
            events.append(Removed([_hashable(h) for h in raw.get("block_hashes") or []]))
        elif kind == "AllBlocksCleared":
            events.append(Cleared())
    return events


def encode(sequence: int, events: Sequence[Event], block_size: int = 16) -> list[bytes]:
    """A message as vLLM's publisher sends it (the test engine publishes with this)."""
    out: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, Stored):
            out.append(
                {
                    "type": "BlockStored",
                    "block_hashes": event.hashes,
                    "parent_block_hash": event.parent,
                    "token_ids": [0] * (block_size * len(event.hashes)),
                    "block_size": block_size,
                    "lora_id": None,
                    "medium": "CPU",
                    "lora_name": None,
                    "session_id": event.session,
                }
            )
        elif isinstance(event, Removed):
            out.append({"type": "BlockRemoved", "block_hashes": event.hashes, "medium": "CPU"})
        else:
            out.append({"type": "AllBlocksCleared"})
    payload = msgspec.msgpack.encode([time.time(), out, None])
    return [TOPIC, sequence.to_bytes(8, "big"), payload]

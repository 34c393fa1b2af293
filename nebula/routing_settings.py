"""The settings of how routers choose a replica: a part of `nebula.settings.Settings`
(which inherits these fields, with its prefix, sources and validation)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings


class RoutingSettings(BaseSettings):
    """Cache-aware routing (docs/architecture.md, "Cache-aware routing")."""

    routing_policy: Literal["prefix", "least_outstanding"] = Field(
        "prefix",
        description="How chat and completion requests pick a replica: prefix (the replica "
        "that likely holds the prompt's prefix in its KV cache, bounded by load) or "
        "least_outstanding. Embeddings always use least_outstanding.",
    )
    prefix_load_factor: float = Field(
        1.25,
        ge=1.0,
        le=10.0,
        description="Prefix routing's load bound: a replica takes a prefix's requests while "
        "it has at most this times the average load (KubeAI's default, 125 %), plus "
        "prefix_load_slack.",
    )
    prefix_load_slack: int = Field(
        2,
        ge=0,
        le=1024,
        description="Requests a replica may have in flight beyond prefix_load_factor's bound "
        "before a conversation moves off its cache (an engine batches: one or two more cost "
        "less than a cold prefill). 0: KubeAI's bare bound.",
    )
    prefix_chars: int = Field(
        16384,
        ge=16,
        le=1_048_576,
        description="Prefix routing reads at most this many characters of a prompt "
        "(hashing costs about 1 us per chunk; a longer prompt's tail is not told apart).",
    )
    prefix_chunk_chars: int = Field(
        256,
        ge=16,
        le=65536,
        description="Prefix routing cuts the prompt every this many characters (and at "
        "every message's end); a cut is what one replica is known to hold.",
    )
    kv_events: bool = Field(
        True,
        description="Chat engines publish their KV-cache events to their node's agent, "
        "which tells the routers when an engine evicted a prompt they sent (precise "
        "prefix routing); off: the routers' index forgets by its own LRU only.",
    )
    prefix_index_keys: int = Field(
        200_000,
        ge=1000,
        le=50_000_000,
        description="Prefix keys each router process remembers (about 200 bytes each: 40 MB at the "
        "default), "
        "the least recently used forgotten first.",
    )

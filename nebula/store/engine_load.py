"""What each engine last reported of its load, for the routers' load bound.

A router knows its own requests in flight; other routers' requests, and what
queues inside an engine, only the engine knows. The node's agent reads each
healthy engine's `vllm:num_requests_running`, `vllm:num_requests_waiting` and
`vllm:kv_cache_usage_perc` every probe and writes them here; routers read them
once a second.

Keys (spelled in `nebula.redis_keys`):
- `nebula:engine-load:{node}` hash with a TTL of a few probes: placement id ->
  "running waiting kv_usage". A node that stops reporting takes its figures
  with it; a reader treats a missing figure as "nothing beyond my own".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nebula import redis_keys
from nebula.store.core import Core


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: int
    waiting: int
    kv_usage: float  # 0..1

    def encode(self) -> str:
        return f"{self.running} {self.waiting} {self.kv_usage:.4f}"

    @classmethod
    def decode(cls, raw: str) -> EngineLoad | None:
        try:
            running, waiting, kv = raw.split()
            return cls(max(0, int(running)), max(0, int(waiting)), float(kv))
        except ValueError:
            return None  # not written by this version: unknown, not zero load


class EngineLoads:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def report(self, node: str, loads: Mapping[str, EngineLoad], ttl_s: float) -> None:
        key = redis_keys.engine_load(node)
        redis = self.core.redis
        async with self.core.reachable(), redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if loads:
                pipe.hset(key, mapping={pid: load.encode() for pid, load in loads.items()})
                pipe.pexpire(key, int(ttl_s * 1000))
            await pipe.execute()

    async def of(self, nodes: Iterable[str]) -> dict[str, EngineLoad]:
        """Placement id -> its engine's last report, on these nodes."""
        nodes = sorted(set(nodes))
        if not nodes:
            return {}
        async with self.core.reachable(), self.core.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.hgetall(redis_keys.engine_load(node))
            answers = await pipe.execute()
        out = {}
        for answer in answers:
            for pid, raw in answer.items():
                load = EngineLoad.decode(raw)
                if load is not None:
                    out[pid] = load
        return out

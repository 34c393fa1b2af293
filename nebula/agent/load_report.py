"""The engines' load, as they report it, for the routers' load bound
(store/engine_load.py): each published engine's running and waiting requests
and KV-cache usage, read from its /metrics every probe interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from nebula.loops import every
from nebula.store import State
from nebula.store.engine_load import EngineLoad

log = logging.getLogger(__name__)

READ_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
# A report outlives this many probe intervals (and at least TTL_FLOOR_S): a node
# that stops reporting stops weighing on the routers' choices soon after.
TTL_PROBES = 3
TTL_FLOOR_S = 5.0


def parse(metrics_text: str) -> EngineLoad:
    """vLLM's running, waiting and KV-cache usage gauges (summed over its labels)."""
    values = {
        "vllm:num_requests_running": 0.0,
        "vllm:num_requests_waiting": 0.0,
        "vllm:kv_cache_usage_perc": 0.0,
    }
    for family in text_string_to_metric_families(metrics_text):
        if family.name in values:
            values[family.name] += sum(sample.value for sample in family.samples)
    return EngineLoad(
        int(values["vllm:num_requests_running"]),
        int(values["vllm:num_requests_waiting"]),
        min(1.0, values["vllm:kv_cache_usage_perc"]),
    )


async def read(session: aiohttp.ClientSession, url: str) -> EngineLoad | None:
    try:
        async with session.get(url + "/metrics", timeout=READ_TIMEOUT) as r:
            return parse(await r.text()) if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None  # unknown: left out, and the routers count only their own


async def report_forever(
    state: State,
    session: aiohttp.ClientSession,
    node_id: str,
    published: Callable[[], Mapping[str, str]],
    interval_s: float,
) -> None:
    """Every `interval_s`: read the engines `published()` names (placement id ->
    URL) and store what they said."""
    ttl = max(TTL_FLOOR_S, TTL_PROBES * interval_s)
    reported = True  # a report of an earlier life of this agent may be there

    async def report() -> None:
        nonlocal reported
        urls = published()
        answers = await asyncio.gather(*(read(session, url) for url in urls.values()))
        loads = {pid: load for pid, load in zip(urls, answers, strict=True) if load is not None}
        if loads or reported:
            await state.engine_load.report(node_id, loads, ttl)
            reported = bool(loads)

    await every("reporting the engines' load", interval_s, report)

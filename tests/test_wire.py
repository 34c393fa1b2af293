"""Wire formats: versioned, and readable across a rolling upgrade in both directions."""

from __future__ import annotations

import json

import redis.asyncio

from nebula import redis_keys
from nebula.catalog import load_catalog
from nebula.models import Endpoint, Phase, Placement, PlacementState
from nebula.store import State, endpoints, placements, request_format, wire

SPEC = load_catalog().get_spec("minilm_l6_embedding")


async def test_every_stored_value_carries_the_layout_version(state: State, redis_url: str) -> None:
    request = await state.requests.create(SPEC, 1)
    p = Placement(id="p1", request_id=request.id, node="n1", port=8100, spec=SPEC)
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await client.hget(redis_keys.request(request.id), "v") == str(wire.VERSION)
        assert json.loads(placements.encode(p))["v"] == wire.VERSION
        await state.placements.report("n1", {"p1": PlacementState(Phase.HEALTHY)})
        raw = await client.hget(redis_keys.placement_state("n1"), "p1")
        assert raw is not None and json.loads(raw)["v"] == wire.VERSION
    finally:
        await client.aclose()


async def test_a_newer_writers_fields_are_ignored(state: State, redis_url: str) -> None:
    request = await state.requests.create(SPEC, 1)
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        # A newer Nebula adds fields everywhere: a hash field, spec keys, JSON keys.
        spec = json.loads(await client.hget(redis_keys.request(request.id), "spec") or "{}")
        await client.hset(
            redis_keys.request(request.id),
            mapping={"v": "2", "priority": "high", "spec": json.dumps({**spec, "lora": ["x"]})},
        )
        assert (await state.requests.get(request.id)).spec == SPEC

        p = json.loads(placements.encode(Placement("p1", request.id, "n1", 8100, SPEC)))
        p.update(v=2, numa_node=1, spec={**p["spec"], "lora": ["x"]})
        await client.hset(redis_keys.placements("n1"), "p1", json.dumps(p))
        [placement] = await state.placements.of_node("n1")
        assert placement.spec == SPEC and placement.port == 8100

        e = json.loads(endpoints.encode(Endpoint("p1", request.id, SPEC.name, "n1", "http://x")))
        assert endpoints.decode(json.dumps({**e, "v": 2, "weight": 3})).url == "http://x"
    finally:
        await client.aclose()


def test_an_older_writers_missing_fields_take_their_defaults() -> None:
    # As a Nebula before `ever_ready`, `failures`, `retry_at` and `v` wrote it.
    old = {
        "id": "m-1",
        "model": SPEC.name,
        "spec": json.dumps({"name": SPEC.name, "model": SPEC.model}),
        "replicas": "2",
        "status": "Ready",
        "created_at": "1.0",
        "updated_at": "2.0",
    }
    request = request_format.decode(old)
    assert request.replicas == 2 and request.failures == 0 and not request.ever_ready
    assert request.spec.engine_args == () and request.spec.engine == "vllm"
    state = placements.decode_state(json.dumps({"phase": "Healthy"}))
    assert state.phase is Phase.HEALTHY and state.restarts == 0

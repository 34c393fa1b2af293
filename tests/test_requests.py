"""Model requests in Redis: create, show, list, delete; bad input changes nothing."""

from __future__ import annotations

import pytest
import redis

from nebula.catalog import load_catalog
from nebula.errors import Conflict, InvalidRequest, NotFound, StateUnavailable
from nebula.models import Status
from nebula.store import State

CATALOG = load_catalog()


def dump(url: str) -> dict[str, object]:
    """Every key with its type and value: to prove that nothing changed."""
    client = redis.Redis.from_url(url, decode_responses=True)
    out: dict[str, object] = {}
    for key in sorted(client.keys("*")):
        kind = client.type(key)
        if kind == "hash":
            out[key] = client.hgetall(key)
        elif kind == "set":
            out[key] = sorted(client.smembers(key))
        elif kind == "stream":
            out[key] = client.xrange(key)
        else:
            out[key] = client.get(key)
    client.close()
    return out


async def test_load_show_list_unload(state: State) -> None:
    request = await state.requests.create(CATALOG.get_spec("smollm2_135m_chat"), 2)
    assert request.status is Status.PENDING
    assert request.id.startswith("smollm2_135m_chat-")
    by_id = await state.requests.get(request.id)
    by_name = await state.requests.get("smollm2_135m_chat")
    assert by_id == by_name == request
    assert [r.id for r in await state.requests.all()] == [request.id]
    events = await state.requests.events(request.id)
    assert [e["message"] for e in events] == ["load asked: 2 replica(s)"]

    unloading = await state.requests.unload("smollm2_135m_chat")
    assert unloading.status is Status.UNLOADING
    assert (await state.requests.get(request.id)).status is Status.UNLOADING
    # Unload is never straight to gone, and asking twice is harmless.
    again = await state.requests.unload(request.id)
    assert again.status is Status.UNLOADING
    assert [e["status"] for e in await state.requests.events(request.id)] == [
        "Pending",
        "Unloading",
    ]


async def test_loading_twice_is_a_conflict_that_changes_nothing(
    state: State, redis_url: str
) -> None:
    first = await state.requests.create(CATALOG.get_spec("minilm_l6_embedding"), 1)
    before = dump(redis_url)
    with pytest.raises(Conflict, match=f"already loaded as request {first.id}"):
        await state.requests.create(CATALOG.get_spec("minilm_l6_embedding"), 3)
    assert dump(redis_url) == before


@pytest.mark.parametrize("replicas", [0, -1, 257, True, "2", 1.5])
async def test_bad_replicas_change_nothing(state: State, redis_url: str, replicas: object) -> None:
    before = dump(redis_url)
    with pytest.raises(InvalidRequest, match="replicas must be"):
        await state.requests.create(CATALOG.get_spec("minilm_l6_embedding"), replicas)  # type: ignore[arg-type]
    assert dump(redis_url) == before == {}


async def test_unknown_model_and_bad_overrides_change_nothing(state: State, redis_url: str) -> None:
    await state.requests.create(CATALOG.get_spec("minilm_l6_embedding"), 1)
    before = dump(redis_url)
    with pytest.raises(NotFound, match="'llama-9000' is not in the catalog"):
        CATALOG.get_spec("llama-9000")
    for fraction in (0.0, 1.2):
        with pytest.raises(InvalidRequest):
            CATALOG.resolve("qwen2_5_0_5b_chat", {"gpu_memory_utilization": fraction})
    with pytest.raises(
        NotFound, match="no model request 'nope'; loaded models: minilm_l6_embedding"
    ):
        await state.requests.unload("nope")
    with pytest.raises(NotFound):
        await state.requests.get("nope")
    assert dump(redis_url) == before


async def test_event_history_is_capped(state: State, redis_url: str) -> None:
    request = await state.requests.create(CATALOG.get_spec("minilm_l6_embedding"), 1)
    client = redis.asyncio.Redis.from_url(redis_url)
    async with client.pipeline(transaction=False) as pipe:
        for i in range(50):
            state.requests.stage_event(pipe, request.id, f"event {i}", Status.PENDING)
        await pipe.execute()
    await client.aclose()
    events = await state.requests.events(request.id)
    assert len(events) == 20  # the fixture's event_history
    assert events[-1]["message"] == "event 49"


async def test_unreachable_redis_is_a_clear_error() -> None:
    state = State("redis://127.0.0.1:1/0")
    with pytest.raises(StateUnavailable, match=r"cannot reach Redis at redis://127\.0\.0\.1:1/0"):
        await state.requests.all()
    await state.close()


def test_passwords_never_appear_in_messages() -> None:
    from nebula.settings import redact

    assert redact("redis://:s3cret@h:6379/0") == "redis://***@h:6379/0"
    assert redact("redis://user:s3cret@h:6379/0") == "redis://user:***@h:6379/0"

"""What whoever can write to Redis can make Nebula do. Each test failed on the code
before (30e7774 and after): the agent ran whatever a placement said, and routers sent
a model's traffic (and the engine key) to whatever URL an endpoint named."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.cluster import Cluster, wait_for
from harness.endpoints import announce
from harness.processes import EngineProcess, RouterProcess
from nebula.agent.programs import program_name
from nebula.models import Endpoint, ModelSpec, Status
from nebula.store import State
from tests.security.conftest import CHAT
from tests.security.test_cluster_inputs import INJECTIONS
from tests.security.test_router_edges import http, served


async def test_an_endpoint_at_a_host_its_node_did_not_register_is_ignored(
    state: State, router: RouterProcess, engines: Callable[..., EngineProcess]
) -> None:
    honest, rogue = engines(CHAT), engines(CHAT)
    await announce(state, Endpoint("p-honest", "r", CHAT, "node-1", honest.url, "chat"))
    await served(router, 1)
    # Written straight into Redis: the same model on the same node, at another host
    # name (which reaches the rogue engine), and on a node that never registered.
    rogue_url = honest.url.replace("127.0.0.1", "localhost").replace(
        str(honest.port), str(rogue.port)
    )
    await state.endpoints.publish(Endpoint("p-rogue", "r", CHAT, "node-1", rogue_url, "chat"))
    await state.endpoints.publish(Endpoint("p-ghost", "r", CHAT, "ghost", rogue.url, "chat"))

    async def logged() -> bool:
        text = router.log.read_text()
        return "not routing to endpoint p-rogue" in text and "p-ghost" in text

    await wait_for(logged, 15, "the router refusing both endpoints")
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(20):
        assert http("POST", router.url + "/v1/chat/completions", body)[0] == 200
    assert rogue.served() == 0 and honest.served() == 20
    _, _, health = http("GET", router.url + "/health")
    assert json.loads(health)["endpoints"] == 1


FORGED = ("code", "reserved", "spelled", "model", "section", "include", "percent", "fine")
CATALOG = "".join(
    f"""
[models.chat_{what}]
model = "test/chat"
engine = "test"
cpu_memory_gib = 0.5
engine_args = ["--tokens", "4"]
"""
    for what in FORGED
)


@pytest.fixture
def node(redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(redis_url, tmp_path, CATALOG)
    yield cluster
    cluster.close()


async def test_a_placement_redis_alone_asked_for_never_starts(state: State, node: Cluster) -> None:
    def spec(what: str, **changes: object) -> ModelSpec:
        return dataclasses.replace(node.catalog.get_spec(f"chat_{what}"), **changes)

    own = ("--tokens", "4")
    forged = {
        "code": spec("code", engine_args=(*own, "--trust-remote-code")),
        "reserved": spec("reserved", engine_args=(*own, "--api-key", "stolen")),
        "spelled": spec("spelled", engine_args=("--api_key=stolen", *own)),
        "model": spec("model", model="/tmp/not-the-catalogs"),
        # What tests/security/test_cluster_inputs.py sends through the API (which
        # refuses it first), here where only the agent stands between it and a
        # program file: a new section, an include, supervisord's own expansion.
        "section": spec("section", engine_args=(*own, INJECTIONS[0])),
        "include": spec("include", engine_args=(*own, INJECTIONS[2])),
        "percent": spec("percent", engine_args=(*own, "%(ENV_HOME)s")),
        "name": spec("fine", name="not_in_the_catalog"),
    }
    made = {what: await state.requests.create(spec, 1) for what, spec in forged.items()}

    async def all_failed() -> bool:
        found = [await state.requests.get(r.id) for r in made.values()]
        return all(r.status is Status.FAILED for r in found)

    await wait_for(all_failed, 90, "every forged request failed")
    # Why each failed: the agent's vetting ("refused: ..."), or for a line break its
    # check that an argument is plain text.
    why = {"section": "control character", "include": "control character"}
    for what, request in made.items():
        message = (await state.requests.get(request.id)).message
        assert why.get(what, "refused:") in message, (what, message)
    # None was ever written as a program, so none ran.
    programs = {p.name for p in node.paths.programs.glob("*.conf")}
    for placement, _ in await state.placements.all(["node-a"]):
        assert program_name(placement.id) + ".conf" not in programs
    # The catalog's own spec, with what the API may add, still runs.
    ok = spec("fine", engine_args=(*own, "--max-model-len", "256"))
    fine = await state.requests.create(ok, 1)
    deadline = time.monotonic() + 60
    while (await state.requests.get(fine.id)).status is not Status.READY:
        assert time.monotonic() < deadline, node.agent_log()[-3000:]
        time.sleep(0.2)

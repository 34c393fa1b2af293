"""The alerts fire for the faults they are about: dashboards/alerts_test.yml feeds
Prometheus' own rule engine (`promtool test rules`) the series a scheduler exports
when a node dies (a counter bump and a one-pass gauge, the agent's target gone
from discovery) and when no scheduler leads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from prometheus_client import REGISTRY

from nebula.catalog import load_catalog
from nebula.scheduler.service import Scheduler
from nebula.settings import Settings
from nebula.store import State
from tests.builders import cpu_node
from tests.nodesim import NodeSim

DASHBOARDS = Path(__file__).parents[2] / "dashboards"


def test_alert_rules_are_valid_and_fire_in_their_unit_tests() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed; shell/test installs Debian's prometheus"
    checked = subprocess.run(
        [promtool, "check", "rules", str(DASHBOARDS / "alerts.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", str(DASHBOARDS / "alerts_test.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


async def test_a_standby_scheduler_exports_no_stale_cluster_gauges(
    state: State, settings: Settings
) -> None:
    node = NodeSim(state, cpu_node("cpu-a"))
    await node.beat()
    leader = Scheduler(state, settings, identity="first")
    await state.requests.create(load_catalog().get_spec("smollm2_135m_chat"), 1)
    await leader.step()
    assert REGISTRY.get_sample_value("nebula_scheduler_requests", {"status": "Pending"}) == 1
    assert REGISTRY.get_sample_value("nebula_scheduler_nodes", {"state": "alive"}) == 1
    # Another scheduler takes the lease (the first one was paused past its TTL).
    await state.lease.release("first")
    assert await state.lease.acquire_or_renew("second", 60, held=False)
    await leader.step()
    assert not leader.is_leader
    assert REGISTRY.get_sample_value("nebula_scheduler_leader") == 0
    for name, labels in [("nebula_scheduler_requests", {"status": "Pending"}),
                         ("nebula_scheduler_nodes", {"state": "alive"})]:  # fmt: skip
        assert REGISTRY.get_sample_value(name, labels) is None, f"{name} still exported"

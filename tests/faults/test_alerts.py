"""The alerts fire for the faults they are about: dashboards/alerts_test.yml feeds
Prometheus' own rule engine (`promtool test rules`) the series a scheduler exports
when a node dies (a counter bump and a one-pass gauge, the agent's target gone
from discovery) and when no scheduler leads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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

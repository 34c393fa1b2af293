"""A node's telemetry when its GPUs misbehave: one failing NVML call never takes the
node out. This machine has no GPU, so NVML is replaced by a source that fails on
cue (the real NVML path runs on GPU nodes); the heartbeat goes to a real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nebula import redis_keys
from nebula.agent.service import Agent
from nebula.agent.supervisor import Supervisor
from nebula.agent.telemetry import Telemetry
from nebula.settings import Settings
from nebula.store import State

MIB = 1024 * 1024


class NVMLError(Exception):
    pass


class FlakyNvml:
    """NVML's calls for `count` GPUs; `broken` GPUs (and `count_broken`) raise."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, count: int) -> None:
        self.count = count
        self.broken: set[int] = set()
        self.count_broken = False

    def nvmlDeviceGetCount(self) -> int:
        if self.count_broken:
            raise NVMLError("Unknown Error")
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return f"GPU {handle}".encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        if handle in self.broken:
            raise NVMLError("GPU is lost")
        return SimpleNamespace(total=80_000 * MIB, used=(1000 + handle) * MIB)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=50)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 60

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        raise NVMLError("Not Supported")


def test_one_failing_gpu_is_reported_from_its_last_good_sample() -> None:
    nvml = FlakyNvml(2)
    telemetry = Telemetry(nvml=nvml)
    good = telemetry.gpus()
    assert [d.memory_used_mib for d in good] == [1000, 1001]
    assert good[0].power_w is None  # unsupported readings are left out, as before

    nvml.broken = {1}
    devices = telemetry.gpus()
    assert devices == good  # GPU 0 read afresh, GPU 1 from its last good sample
    nvml.count_broken = True
    assert telemetry.gpus() == good  # NVML itself failing: the last good devices

    fresh = Telemetry(nvml=FlakyNvml(2))
    fresh.nvml.broken = {0}
    first = fresh.gpus()
    # Never read: reported with no memory, so nothing new is placed on it.
    assert (first[0].memory_total_mib, first[0].name) == (0, "unreadable (NVML error)")
    assert first[1].memory_total_mib == 80_000


class FailingOnce(Telemetry):
    """A telemetry source whose first sample fails with an error nobody expected."""

    def __init__(self) -> None:
        super().__init__(nvml=FlakyNvml(1))
        self.calls = 0

    def sample(self, settings: Settings) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("driver went away")
        return super().sample(settings)


async def test_the_heartbeat_survives_a_telemetry_error(redis_url: str, tmp_path: Path) -> None:
    settings = Settings(
        redis_url=redis_url, node_id="gpu-node", heartbeat_interval_s=0.1, state_dir=tmp_path
    )
    async with State(redis_url) as state:
        telemetry = FailingOnce()
        supervisor = Supervisor(tmp_path / "none.sock", tmp_path, tmp_path)
        agent = Agent(state, settings, supervisor, telemetry)
        beating = asyncio.create_task(agent._heartbeat_loop())
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while not await state.redis.exists(redis_keys.node("gpu-node")):
                assert not beating.done(), f"the heartbeat loop died: {beating.exception()!r}"
                assert asyncio.get_running_loop().time() < deadline, "no heartbeat"
                await asyncio.sleep(0.05)
            assert telemetry.calls >= 2
            [device] = (await state.nodes.live())[0].devices
            assert device.name == "GPU 0"
        finally:
            beating.cancel()

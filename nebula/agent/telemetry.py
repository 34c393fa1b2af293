"""What a node reports of itself: GPUs through NVML, else CPUs and RAM.

NVML (nvidia-ml-py) gives per GPU its name, memory total/used, utilisation,
temperature and power. A machine without NVIDIA's driver has no NVML: it is
a CPU node, and that is no error.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psutil

from nebula import __version__
from nebula.models import Device, Node
from nebula.settings import Settings

log = logging.getLogger(__name__)
MIB = 1024 * 1024


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:  # no library, no driver, no device: a CPU node
        log.info("no NVML (%s): reporting CPUs and RAM", type(exc).__name__)
        return None


class Telemetry:
    def __init__(self) -> None:
        self.nvml = _nvml()

    def gpus(self) -> tuple[Device, ...]:
        nv = self.nvml
        if nv is None:
            return ()
        devices = []
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(handle)
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nv.NVMLError:
                util = 0.0
            try:
                temp: float | None = float(
                    nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)
                )
            except nv.NVMLError:
                temp = None
            try:
                power: float | None = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except nv.NVMLError:
                power = None
            devices.append(
                Device(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_mib=int(memory.total // MIB),
                    memory_used_mib=int(memory.used // MIB),
                    utilization_pct=util,
                    temperature_c=temp,
                    power_w=power,
                )
            )
        return tuple(devices)

    def sample(self, settings: Settings) -> Node:
        total, available = memory_mib()
        return Node(
            id=settings.node_id,
            address=settings.node_address,
            devices=self.gpus(),
            cpu_count=os.cpu_count() or 0,
            ram_total_mib=total,
            ram_available_mib=available,
            port_min=settings.engine_port_min,
            port_max=settings.engine_port_max,
            version=__version__,
            heartbeat_at=time.time(),
        )


def memory_mib() -> tuple[int, int]:
    """(total, available) RAM in MiB."""
    memory = psutil.virtual_memory()
    return memory.total // MIB, memory.available // MIB

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
    """Samples this node. One GPU whose NVML calls fail never takes the node out: that
    device is reported from its last good sample (or, never read, with no memory, so
    nothing new is placed on it), and the others as they are; a failure of NVML as a
    whole reports the last good devices. Each failure is logged once until it clears."""

    def __init__(self, nvml: Any | None = None) -> None:
        self.nvml = _nvml() if nvml is None else nvml
        self.last: dict[int, Device] = {}  # index -> last good sample
        self.failing: set[int | None] = set()  # devices (None: NVML itself) now failing

    def gpus(self) -> tuple[Device, ...]:
        nv = self.nvml
        if nv is None:
            return ()
        try:
            count = nv.nvmlDeviceGetCount()
        except Exception as exc:
            self._failed(None, exc)
            return tuple(self.last[i] for i in sorted(self.last))
        self._cleared(None)
        devices = []
        for i in range(count):
            try:
                device = _sample_gpu(nv, i)
            except Exception as exc:
                self._failed(i, exc)
                device = self.last.get(i) or Device(i, "unreadable (NVML error)", 0, 0)
            else:
                self._cleared(i)
                self.last[i] = device
            devices.append(device)
        return tuple(devices)

    def _failed(self, index: int | None, exc: Exception) -> None:
        if index not in self.failing:
            what = "NVML" if index is None else f"GPU {index}"
            log.warning(
                "%s: telemetry failed (%s: %s); reporting its last good sample",
                what,
                type(exc).__name__,
                exc,
            )
            self.failing.add(index)

    def _cleared(self, index: int | None) -> None:
        if index in self.failing:
            self.failing.discard(index)
            log.info("%s: telemetry back", "NVML" if index is None else f"GPU {index}")

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


def _sample_gpu(nv: Any, i: int) -> Device:
    """One GPU through NVML; the optional readings are left out where unsupported."""
    handle = nv.nvmlDeviceGetHandleByIndex(i)
    name = nv.nvmlDeviceGetName(handle)
    memory = nv.nvmlDeviceGetMemoryInfo(handle)
    try:
        util = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
    except nv.NVMLError:
        util = 0.0
    try:
        temp: float | None = float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
    except nv.NVMLError:
        temp = None
    try:
        power: float | None = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
    except nv.NVMLError:
        power = None
    return Device(
        index=i,
        name=name.decode() if isinstance(name, bytes) else str(name),
        memory_total_mib=int(memory.total // MIB),
        memory_used_mib=int(memory.used // MIB),
        utilization_pct=util,
        temperature_c=temp,
        power_w=power,
    )


def memory_mib() -> tuple[int, int]:
    """(total, available) RAM in MiB."""
    memory = psutil.virtual_memory()
    return memory.total // MIB, memory.available // MIB

"""Small builders for domain objects in tests."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from nebula.models import Device, ModelRequest, ModelSpec, Node, Status

GIB = 1024


def gpu_node(
    node_id: str, gpus: int = 2, used: tuple[float, ...] = (), total_mib: int = 81920, **kw: object
) -> Node:
    used_fractions = used or (0.0,) * gpus
    devices = tuple(
        Device(
            index=i,
            name="NVIDIA H100 80GB HBM3",
            memory_total_mib=total_mib,
            memory_used_mib=int(total_mib * used_fractions[i]),
        )
        for i in range(gpus)
    )
    return Node(id=node_id, address="127.0.0.1", devices=devices, **kw)  # type: ignore[arg-type]


def cpu_node(
    node_id: str, ram_gib: float = 24, available_gib: float | None = None, **kw: object
) -> Node:
    available = ram_gib if available_gib is None else available_gib
    return Node(
        id=node_id,
        address="127.0.0.1",
        cpu_count=2,
        ram_total_mib=int(ram_gib * GIB),
        ram_available_mib=int(available * GIB),
        **kw,  # type: ignore[arg-type]
    )


def request(
    request_id: str,
    *,
    gpu: float | None = None,
    cpu: float | None = None,
    replicas: int = 1,
    tp: int = 1,
    created_at: float = 0.0,
    status: Status = Status.PENDING,
) -> ModelRequest:
    spec = ModelSpec(
        name=f"model-{request_id}",
        model="org/model",
        gpu_memory_utilization=gpu,
        cpu_memory_gib=cpu,
        tensor_parallel_size=tp,
    )
    return ModelRequest(
        id=request_id, spec=spec, replicas=replicas, status=status, created_at=created_at
    )


def ids(prefix: str = "p") -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter)}"

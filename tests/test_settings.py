from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nebula import settings
from nebula.errors import ConfigError
from nebula.settings import load_settings


@pytest.fixture(autouse=True)
def no_config_of_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The places a config file is looked for, under the test's own folder: a
    nebula.toml in the working directory, ~/.config or /etc of the machine running
    the tests must not decide what a test sees."""
    home = tmp_path / "home"
    monkeypatch.setattr(
        settings,
        "CONFIG_CANDIDATES",
        (
            tmp_path / "cwd" / "nebula.toml",
            home / ".config/nebula/nebula.toml",
            tmp_path / "etc.toml",
        ),
    )
    monkeypatch.delenv("NEBULA_CONFIG", raising=False)
    for name in [n for n in os.environ if n.startswith("NEBULA_")]:
        monkeypatch.delenv(name)
    return home


def test_environment_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "nebula.toml"
    config.write_text('redis_url = "redis://10.0.0.5:6379/1"\nmemory_ceiling = 0.8\n')
    monkeypatch.setenv("NEBULA_CONFIG", str(config))
    settings = load_settings()
    assert settings.redis_url == "redis://10.0.0.5:6379/1"
    assert settings.memory_ceiling == 0.8
    monkeypatch.setenv("NEBULA_MEMORY_CEILING", "0.7")
    assert load_settings().memory_ceiling == 0.7  # the environment wins over the file


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("NEBULA_REDIS_URL", "localhost:6379", "is not a Redis URL"),
        ("NEBULA_REDIS_URL", "redis://", "has no host"),
        ("NEBULA_MEMORY_CEILING", "1.5", "memory_ceiling"),
        ("NEBULA_HEARTBEAT_INTERVAL_S", "soon", "heartbeat_interval_s"),
        ("NEBULA_LOG_LEVEL", "LOUD", "is not a log level"),
        ("NEBULA_ENGINE_PORT_MIN", "9000", "engine_port_min 9000 is above engine_port_max"),
    ],
)
def test_bad_values_are_named(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match="invalid settings") as err:
        load_settings()
    assert expected in err.value.message


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEBULA_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"missing\.toml, which is not a readable file"):
        load_settings()


def test_daemon_with_bad_redis_url_exits_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"  # not /etc's or ~/.config's, whatever they hold
    empty.write_text("")
    env = {
        "NEBULA_REDIS_URL": "http://127.0.0.1:6379",
        "NEBULA_CONFIG": str(empty),
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "nebula.daemons", "scheduler"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "redis_url: 'http://127.0.0.1:6379' is not a Redis URL" in result.stderr

"""Engine arguments are data, never syntax: the checks without a cluster.

The catalog's and the API's checks see one spelling of every flag; the program
file that supervisord reads is rendered so that, whatever an argument holds, it
is one value of one key of one section (read back here with supervisord's own
config parser), or the engine fails with a clear error and no file is written.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from supervisor.datatypes import dict_of_key_value_pairs
from supervisor.options import UnhosedConfigParser, expand

from nebula.agent.programs import Program
from nebula.agent.supervisor import UnsafeProgram, render
from nebula.catalog import load_catalog, parse_catalog
from nebula.errors import CatalogError, InvalidRequest

CATALOG = load_catalog()
INJECTIONS = [
    "\n[program:evil]\ncommand=/usr/bin/touch /tmp/nebula-pwned\nignored=",
    "x\r[program:evil]",
    "--max-model-len=64\n[include]\nfiles=/tmp/*.conf",
    "a\u2028[program:evil]",
    "--dtype auto ;comment",
    "%(here)s",
]


@pytest.mark.parametrize("arg", INJECTIONS)
def test_the_api_refuses_arguments_that_hold_syntax(arg: str) -> None:
    with pytest.raises(InvalidRequest):
        CATALOG.resolve("qwen2_5_0_5b_chat", {"engine_args": [arg]})


@pytest.mark.parametrize(
    "args",
    [
        ["--api_key=stolen"],
        ["--api-key", "stolen"],
        ["--served_model_name", "other"],
        ["--served-model-name=other"],
        ["--model", "/etc"],
        ["--model=evil/repo"],
        ["-tp", "8"],
        ["--tensor_parallel_size=8"],
        ["--host=0.0.0.0"],
        ["--port", "22"],
        ["--trust-remote-code"],
        ["--trust_remote_code"],
        ["--middleware", "os.system"],
        ["--chat-template", "/etc/shadow"],
        ["--allowed-local-media-path", "/"],
        ["--max-model-len", "1; rm -rf /"],
        ["--dtype", "auto", "positional"],
        ["--enforce-eager", "yes"],
        ["--max-model-len"],
    ],
)
def test_the_api_takes_only_allowlisted_flags_with_checked_values(args: list[str]) -> None:
    with pytest.raises(InvalidRequest, match="engine_args"):
        CATALOG.resolve("qwen2_5_0_5b_chat", {"engine_args": args})


def test_allowlisted_flags_are_normalised_and_follow_the_catalogs() -> None:
    spec = CATALOG.resolve(
        "qwen2_5_0_5b_chat",
        {"engine_args": ["--max_model_len=4096", "--enforce_eager", "--dtype", "bfloat16"]},
    )
    assert spec.engine_args == (
        "--max-model-len", "8192",  # the catalog's
        "--max-model-len", "4096", "--enforce-eager", "--dtype", "bfloat16",
    )  # fmt: skip


@pytest.mark.parametrize("arg", ["--api_key=x", "--served_model_name", "-tp", "--model=x"])
def test_the_catalog_refuses_reserved_flags_in_any_spelling(arg: str) -> None:
    text = f'[models.m]\nmodel = "x"\ncpu_memory_gib = 1\nengine_args = ["{arg}", "1"]\n'
    with pytest.raises(CatalogError, match="set by Nebula itself"):
        parse_catalog(text, "test.toml")


def _read_back(text: str) -> tuple[list[str], dict[str, str]]:
    """The file as supervisord reads it: sections, and the one program's values."""
    parser = UnhosedConfigParser()
    parser.read_string(text)
    sections = parser.sections()
    values = {k: parser.get(sections[0], k, raw=True) for k in parser.options(sections[0])}
    return sections, values


texts = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40
) | st.sampled_from(INJECTIONS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.lists(texts, max_size=5), env=texts)
@example(args=[INJECTIONS[0]], env="x")
@example(args=["ok"], env='"\n[program:evil]\ncommand=touch x\n')
def test_a_rendered_program_is_one_section_whose_command_is_the_arguments(
    args: list[str], env: str
) -> None:
    program = Program(
        name="engine-abc123",
        command=("/usr/bin/python3", "-m", "engine", *args),
        environment={"SOME_SETTING": env},
        inherited={"VLLM_API_KEY": "NEBULA_ENGINE_API_KEY"},
    )
    try:
        text = render(program, Path("/var/log/nebula"), max_restarts=3)
    except UnsafeProgram as exc:
        assert any(why in exc.message for why in ("control character", "comment", "quote"))
        return
    sections, values = _read_back(text)
    assert sections == ["program:engine-abc123"]
    assert set(values) == {
        "command", "environment", "autostart", "autorestart", "startsecs", "startretries",
        "stopasgroup", "killasgroup", "stopsignal", "stopwaitsecs", "stdout_logfile",
        "redirect_stderr", "stdout_logfile_maxbytes", "stdout_logfile_backups",
    }  # fmt: skip
    expansions = {"ENV_NEBULA_ENGINE_API_KEY": "the-key", "here": "/x", "program_name": "p"}
    command = expand(values["command"], expansions, "command")
    assert tuple(shlex.split(command)) == program.command
    environment = dict_of_key_value_pairs(expand(values["environment"], expansions, "env"))
    assert environment == {"SOME_SETTING": env, "VLLM_API_KEY": "the-key"}

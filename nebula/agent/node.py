"""A node's files and its supervisord: `nebula node` renders the config and runs it.

Layout under `state_dir/node-NODE_ID/`:

    supervisord.conf   rendered from supervisord/supervisord.conf.template
    supervisor.sock    XML-RPC, mode 0700: only the node's user can drive it
    programs/          one file per engine, written only by the agent
    logs/              supervisord's, the agent's and every engine's log
"""

from __future__ import annotations

import os
import shutil
import string
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from nebula.agent.programs import KEY_VARIABLE
from nebula.errors import ConfigError
from nebula.exposure import node_engine_key
from nebula.settings import Settings


@dataclass(frozen=True)
class NodePaths:
    root: Path

    @classmethod
    def of(cls, settings: Settings) -> NodePaths:
        return cls(settings.state_dir / f"node-{settings.node_id}")

    @property
    def config(self) -> Path:
        return self.root / "supervisord.conf"

    @property
    def socket(self) -> Path:
        return self.root / "supervisor.sock"

    @property
    def programs(self) -> Path:
        return self.root / "programs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def template() -> str:
    """The packaged template (a copy of supervisord/supervisord.conf.template)."""
    return resources.files("nebula.agent").joinpath("supervisord.conf.template").read_text()


def render_config(settings: Settings) -> NodePaths:
    paths = NodePaths.of(settings)
    for folder in (paths.root, paths.programs, paths.logs):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if len(str(paths.socket)) > 100:
        raise ConfigError(
            f"socket path {paths.socket} is too long for a unix socket; use a shorter state_dir"
        )
    text = string.Template(template()).substitute(
        socket=paths.socket,
        logs=paths.logs,
        root=paths.root,
        programs=paths.programs,
        python=sys.executable,
    )
    paths.config.write_text(text)
    return paths


async def remove_stale_programs(settings: Settings) -> list[str]:
    """Delete the program files of placements this node should no longer run, before
    supervisord starts (it would start them at once): after a crash the scheduler may
    have moved them elsewhere, and their ports may be given to new placements."""
    from nebula.agent.programs import program_name
    from nebula.models import Desired
    from nebula.store import State

    paths = NodePaths.of(settings)
    if not paths.programs.is_dir():
        return []
    async with State.of(settings) as state:
        wanted = {
            program_name(p.id)
            for p in await state.placements.of_node(settings.node_id)
            if p.desired is Desired.RUN
        }
    removed = []
    for path in sorted(paths.programs.glob("*.conf")):
        if path.stem not in wanted:
            path.unlink(missing_ok=True)
            removed.append(path.stem)
    if removed:
        print(f"nebula node: removed stale engine programs {', '.join(removed)}", file=sys.stderr)
    return removed


def exec_supervisord(settings: Settings) -> None:
    """Replace this process with the node's supervisord (it runs the agent and engines)."""
    # supervisord, the agent and (through `%(ENV_...)s` in program files) the engines
    # take the engine key from this environment; no file but engine.key holds it.
    os.environ[KEY_VARIABLE] = node_engine_key(settings)
    paths = render_config(settings)
    binary = shutil.which(
        "supervisord", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    )
    if binary is None:
        raise ConfigError("supervisord is not installed; install Nebula with its dependencies")
    os.execv(binary, [binary, "-n", "-c", str(paths.config)])


async def serve_agent(settings: Settings) -> None:
    """The node agent (`nebula agent`, which this node's supervisord runs)."""
    from nebula.agent.service import Agent
    from nebula.agent.supervisor import Supervisor
    from nebula.store import State

    paths = NodePaths.of(settings)
    supervisor = Supervisor(paths.socket, paths.programs, paths.logs)
    state = State.of(settings)
    try:
        await Agent(state, settings, supervisor).run()
    finally:
        await state.close()

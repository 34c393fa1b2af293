"""`nebula`: the long-running processes (and node-side tools) of a Nebula cluster.

    nebula scheduler      reconcile model requests with live nodes
    nebula router         the OpenAI-compatible gateway and the admin API
    nebula node           this machine's supervisord, running the agent and engines
    nebula agent          the node agent (run by `nebula node`'s supervisord)
    nebula models prepare make the default CPU models ready on this machine

Settings come from `NEBULA_*` variables and the config file (see
nebula/settings.py and docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from nebula import __version__, redis_acl
from nebula.cli.prepare import add_models_commands, run_models_command
from nebula.errors import ConfigError, NebulaError, StateUnavailable
from nebula.process import die_with_parent, run_async, setup_logging
from nebula.settings import Settings, load_settings
from nebula.store import State

log = logging.getLogger("nebula")

STARTUP_WAIT_S = 15.0


def _setup_logging(settings: Settings) -> None:
    setup_logging(settings.log_level)


async def _wait_for_redis(settings: Settings) -> None:
    """Redis may start a moment after us (one Procfile); give it a short while."""
    state = State.of(settings)
    deadline = asyncio.get_running_loop().time() + STARTUP_WAIT_S
    try:
        while True:
            try:
                await state.ping()
                return
            except StateUnavailable:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await state.close()


async def _scheduler(settings: Settings) -> None:
    from nebula.scheduler.service import serve

    await _wait_for_redis(settings)
    await serve(settings)


async def _router(settings: Settings) -> None:
    if settings.router_workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before any metric exists: workers sum their metrics through this folder.
        folder = tempfile.mkdtemp(prefix="nebula-router-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(shutil.rmtree, folder, True)
    from nebula.router.workers import serve

    await _wait_for_redis(settings)
    await serve(settings)


async def _agent(settings: Settings) -> None:
    from nebula.agent.node import serve_agent

    die_with_parent()  # a node is one unit: no orphan agent if supervisord is killed
    await _wait_for_redis(settings)
    await serve_agent(settings)


async def _node(settings: Settings) -> None:
    from nebula.agent.node import exec_supervisord
    from nebula.exposure import node_engine_key

    node_engine_key(settings)  # an open engine beyond loopback is refused before anything
    await _wait_for_redis(settings)
    from nebula.agent.node import remove_stale_programs

    await remove_stale_programs(settings)  # a wrong URL fails here, not in a restart loop
    exec_supervisord(settings)


COMMANDS: dict[str, tuple[str, Callable[[Settings], Coroutine[Any, Any, None]]]] = {
    "scheduler": ("reconcile model requests with live nodes (one leader at a time)", _scheduler),
    "router": ("serve the OpenAI API, /admin and /metrics (NEBULA_ROUTER_*)", _router),
    "node": ("run this machine's node: supervisord with the agent and its engines", _node),
    "agent": ("the node agent (supervisord runs it; see `nebula node`)", _agent),
}

# Flags that override a setting for one run: (command, flag, setting, type, help).
FLAGS: list[tuple[str, str, str, type, str]] = [
    ("router", "--host", "router_host", str, "listen address (default 127.0.0.1)"),
    ("router", "--port", "router_port", int, "listen port (default 8080)"),
    ("router", "--workers", "router_workers", int, "processes sharing the port (default 1)"),
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nebula",
        description="Nebula's daemons. Settings come from NEBULA_* environment variables "
        "and the config file named by NEBULA_CONFIG.",
    )
    p.add_argument("--version", action="version", version=f"nebula {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_models_commands(sub)
    acl = sub.add_parser(
        "redis-acl",
        help="write Redis ACL users, one per role (scheduler, agent, router, admin)",
        description="Write OUT/users.acl (load it with redis-server's aclfile) and "
        "OUT/<user>.url, the NEBULA_REDIS_URL of each role's processes (built from "
        "NEBULA_REDIS_URL). Each user writes only its role's keys; see docs/operations.md.",
    )
    acl.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write")
    acl.add_argument(
        "--nodes", metavar="NODE,...", help="one agent user per node, limited to its own keys"
    )
    for name, (help_text, _) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        for command, flag, setting, kind, flag_help in FLAGS:
            if command == name:
                metavar = flag.lstrip("-").upper()
                cmd.add_argument(flag, dest=setting, type=kind, help=flag_help, metavar=metavar)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Logs, key files and configs this process (and what it starts) makes: not for
    # other users of the machine.
    os.umask(0o027)
    try:
        overrides = {
            setting: getattr(args, setting)
            for command, _, setting, _, _ in FLAGS
            if command == args.command and getattr(args, setting, None) is not None
        }
        settings = load_settings(**overrides)
        _setup_logging(settings)
        if args.command == "models":
            run_models_command(args, settings)
            return 0
        if args.command == "redis-acl":
            nodes = [n for n in (args.nodes or "").split(",") if n]
            for path in redis_acl.write_files(args.out, settings.redis_url, nodes):
                print(path)
            return 0
        _, run = COMMANDS[args.command]
        run_async(run(settings))
    except ConfigError as exc:
        print(f"nebula: error: {exc.message}", file=sys.stderr)
        return 2
    except NebulaError as exc:
        print(f"nebula: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

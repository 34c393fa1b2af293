"""`nebula`: the long-running processes (and node-side tools) of a Nebula cluster.

    nebula scheduler      reconcile model requests with live nodes

Settings come from `NEBULA_*` variables and the config file (see
nebula/settings.py and docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from nebula import __version__
from nebula.errors import ConfigError, NebulaError, StateUnavailable
from nebula.settings import Settings, load_settings
from nebula.state import State

log = logging.getLogger("nebula")

STARTUP_WAIT_S = 15.0


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _wait_for_redis(settings: Settings) -> None:
    """Redis may start a moment after us (one Procfile); give it a short while."""
    state = State(settings.redis_url)
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


COMMANDS: dict[str, tuple[str, Callable[[Settings], Coroutine[Any, Any, None]]]] = {
    "scheduler": ("reconcile model requests with live nodes (one leader at a time)", _scheduler),
}


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # optional off Linux
        return None
    return uvloop.new_event_loop


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nebula",
        description="Nebula's daemons. Settings come from NEBULA_* environment variables "
        "and the config file named by NEBULA_CONFIG.",
    )
    p.add_argument("--version", action="version", version=f"nebula {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        _setup_logging(settings)
        _, run = COMMANDS[args.command]
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run(settings))
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

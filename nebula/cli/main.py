"""nebula-cli: operate a Nebula cluster through its admin API.

    nebula-cli cluster status
    nebula-cli model list | load NAME [--replicas N] [--keep-alive D] [--wait]
                     | unload REF [--wait]
                     [--drain-timeout S | --now] | show REF
    nebula-cli model wait REF... | pin REF | unpin REF [--keep-alive D]
    nebula-cli node list | cordon NODE | uncordon NODE | drain NODE
    nebula-cli catalog list
    nebula-cli key create NAME [--models GLOB,...] [--budget TOKENS] ... | list | show NAME
                   | delete NAME | usage [--key NAME] [--model NAME] [--days N]

The router's URL comes from --url, NEBULA_URL or the settings (default
http://127.0.0.1:8080); the admin key from NEBULA_ADMIN_KEY or the config
file, never from a flag (it would land in the shell's history).

Exit codes: 0 done; 1 the API refused (the message says why); 2 bad usage;
3 Nebula unreachable; 4 --wait saw the model fail; 5 --wait timed out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from nebula import __version__
from nebula.cli import key_commands
from nebula.cli.client import AdminClient, ClientError, Target, Unreachable
from nebula.cli.commands import (
    WaitFailed,
    WaitTimeout,
    catalog_list,
    cluster_status,
    model_list,
    model_load,
    model_pin,
    model_show,
    model_unload,
    model_wait,
    node_action,
    node_list,
)
from nebula.cli.console import Output

EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_FAILED, EXIT_TIMEOUT = 1, 2, 3, 4, 5


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Raises instead of exiting, so nebula-shell can reuse the commands."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message}")


def parser(prog: str = "nebula-cli") -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: a subcommand that was not given --json leaves the value alone, so
    # `--json` works anywhere on the line (before the group or after the command).
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    p = _Parser(
        prog=prog,
        description="Operate a Nebula cluster through its admin API. The admin key comes from "
        "NEBULA_ADMIN_KEY or the config file.",
    )
    # Its own action (one shared with the subcommands would share its default too).
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--url", help="router URL (default NEBULA_URL, else http://127.0.0.1:8080)")
    p.add_argument("--version", action="version", version=f"nebula-cli {__version__}")
    groups = p.add_subparsers(dest="group", required=True, metavar="GROUP", parser_class=_Parser)

    cluster = groups.add_parser("cluster", help="the cluster as a whole")
    cluster_sub = cluster.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cluster_sub.add_parser("status", parents=[common], help="nodes, GPUs, endpoints").set_defaults(
        run=cluster_status
    )

    _model_commands(groups, common)

    node = groups.add_parser("node", help="list nodes, cordon, drain")
    node_sub = node.add_subparsers(dest="command", required=True, metavar="COMMAND")
    node_sub.add_parser("list", parents=[common], help="live nodes").set_defaults(run=node_list)
    for action, text in (
        ("cordon", "no new placements on NODE"),
        ("uncordon", "undo cordon and drain"),
        ("drain", "cordon NODE and move its replicas off, each once its replacement is healthy"),
    ):
        cmd = node_sub.add_parser(action, parents=[common], help=text)
        cmd.add_argument("node", metavar="NODE")
        cmd.set_defaults(run=node_action, action=action)

    key_commands.add_commands(groups, common)

    catalog = groups.add_parser("catalog", help="the models that can be loaded")
    catalog_sub = catalog.add_subparsers(dest="command", required=True, metavar="COMMAND")
    catalog_sub.add_parser("list", parents=[common], help="catalog models").set_defaults(
        run=catalog_list
    )
    return p


def _model_commands(groups: Any, common: argparse.ArgumentParser) -> None:
    """`nebula-cli model ...`."""
    model = groups.add_parser("model", help="load, unload, list, show models")
    model_sub = model.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_sub.add_parser("list", parents=[common], help="loaded models").set_defaults(
        run=model_list
    )
    _load_command(model_sub, common)
    wait = model_sub.add_parser("wait", parents=[common], help="wait until models are Ready")
    wait.add_argument("refs", nargs="+", metavar="NAME|ID")
    wait.add_argument("--timeout", type=float, default=900, help="limit in seconds")
    wait.set_defaults(run=model_wait)
    _unload_command(model_sub, common)
    pin = model_sub.add_parser(
        "pin", parents=[common], help="never unload REF when idle, never evict it"
    )
    pin.add_argument("ref", metavar="NAME|ID")
    pin.set_defaults(run=model_pin)
    unpin = model_sub.add_parser(
        "unpin", parents=[common], help="let REF unload after a keep-alive without requests"
    )
    unpin.add_argument("ref", metavar="NAME|ID")
    unpin.add_argument(
        "--keep-alive",
        metavar="DURATION",
        help="idle time before it unloads (default: the catalog's, else NEBULA_KEEP_ALIVE)",
    )
    unpin.set_defaults(run=model_pin)
    show = model_sub.add_parser("show", parents=[common], help="placements, states, events")
    show.add_argument("ref", metavar="NAME|ID")
    show.set_defaults(run=model_show)


def _load_command(model_sub: Any, common: argparse.ArgumentParser) -> None:
    load = model_sub.add_parser("load", parents=[common], help="load a catalog model")
    load.add_argument("name", help="catalog name (see `catalog list`)")
    load.add_argument(
        "--replicas",
        metavar="N|MIN..MAX",
        help="engines to run, or a range to follow the load (1..4: start at 1, add up to 3 "
        "more while requests queue); default: the catalog's, else 1",
    )
    load.add_argument(
        "--gpu-memory-utilization", type=float, help="fraction of each GPU, overriding the catalog"
    )
    load.add_argument(
        "--keep-alive",
        metavar="DURATION",
        help='unload after this long without requests ("10m", "1h", 0); default: pinned',
    )
    load.add_argument("--wait", action="store_true", help="show progress until Ready")
    load.add_argument("--timeout", type=float, default=900, help="--wait limit in seconds")
    load.set_defaults(run=model_load)


def _unload_command(model_sub: Any, common: argparse.ArgumentParser) -> None:
    unload = model_sub.add_parser("unload", parents=[common], help="drain, stop and free a model")
    unload.add_argument("ref", metavar="NAME|ID")
    unload.add_argument("--wait", action="store_true", help="show progress until gone")
    drain = unload.add_mutually_exclusive_group()
    drain.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="longest wait for in-flight requests before stopping (default: the catalog's "
        "drain_timeout_s for the model, else the node's, 600 s)",
    )
    drain.add_argument(
        "--now", action="store_true", help="stop at once: in-flight answers are cut off"
    )
    unload.add_argument("--timeout", type=float, default=300, help="--wait limit in seconds")
    unload.set_defaults(run=model_unload)


def run(argv: Sequence[str], out: TextIO, err: TextIO, client: AdminClient | None = None) -> int:
    """Run one command line; the exit code. nebula-shell calls this for each line."""
    try:
        args = parser().parse_args(list(argv))
    except UsageError as exc:
        print(f"error: {exc}; try --help", file=err)
        return EXIT_USAGE
    output = Output(out, args.json)
    client = client or AdminClient(Target.from_environment(args.url))
    try:
        return int(args.run(client, args, output))
    except Unreachable as exc:
        print(f"error: {exc.message}", file=err)
        return EXIT_UNREACHABLE
    except ClientError as exc:
        print(f"error: {exc.message}", file=err)
        return EXIT_API
    except WaitFailed as exc:
        print(f"error: {exc.message}", file=err)
        return EXIT_FAILED
    except WaitTimeout as exc:
        print(f"error: {exc.message}", file=err)
        return EXIT_TIMEOUT


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())

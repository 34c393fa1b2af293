"""nebula-cli: operate a Nebula cluster through its admin API.

    nebula-cli cluster status
    nebula-cli model list | load NAME [--replicas N] [--wait] | unload REF [--wait]
                     [--drain-timeout S | --now] | show REF
    nebula-cli model wait REF...
    nebula-cli node list | cordon NODE | uncordon NODE | drain NODE
    nebula-cli catalog list

The router's URL comes from --url, NEBULA_URL or the settings (default
http://127.0.0.1:8080); the admin key from NEBULA_ADMIN_KEY or the config
file, never from a flag (it would land in the shell's history).

Exit codes: 0 done; 1 the API refused (the message says why); 2 bad usage;
3 Nebula unreachable; 4 --wait saw the model fail; 5 --wait timed out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from nebula import __version__
from nebula.client import AdminClient, ClientError, Target, Unreachable
from nebula.errors import NebulaError

EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_FAILED, EXIT_TIMEOUT = 1, 2, 3, 4, 5

STATUS_COLOURS = {
    "Ready": "32",
    "Healthy": "32",
    "Degraded": "33",
    "Loading": "36",
    "Starting": "36",
    "Scheduled": "36",
    "Pending": "33",
    "Unloading": "35",
    "Stopping": "35",
    "Failed": "31",
}


class WaitFailed(NebulaError):
    pass


class WaitTimeout(NebulaError):
    pass


class Output:
    """Tables for people (colour only on a terminal), JSON for scripts."""

    def __init__(self, stream: TextIO, as_json: bool, colour: bool | None = None) -> None:
        self.stream = stream
        self.as_json = as_json
        self.colour = stream.isatty() if colour is None else colour

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def data(self, value: Any) -> None:
        self.line(json.dumps(value, indent=2, sort_keys=True))

    def paint(self, text: str) -> str:
        code = STATUS_COLOURS.get(text)
        return f"\033[{code}m{text}\033[0m" if code and self.colour else text

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> None:
        if not rows:
            self.line(empty)
            return
        cells = [[str(c) for c in row] for row in rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        self.line(
            "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
        )
        for row in cells:
            padded = [self.paint(c) + " " * (w - len(c)) for c, w in zip(row, widths, strict=True)]
            self.line("  ".join(padded).rstrip())


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.0f}m"


def _gib(mib: float) -> str:
    return f"{mib / 1024:.1f}"


def _resources(node: dict[str, Any]) -> str:
    if node["devices"]:
        parts = [
            f"GPU{d['index']} {_gib(d['memory_used_mib'])}/{_gib(d['memory_total_mib'])}GiB "
            f"{d['utilization_pct']:.0f}%"
            for d in node["devices"]
        ]
        return ", ".join(parts)
    used = node["ram_total_mib"] - node["ram_available_mib"]
    return f"{node['cpu_count']} CPU, RAM {_gib(used)}/{_gib(node['ram_total_mib'])}GiB"


def _node_rows(nodes: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for n in nodes:
        mark = "draining" if n["draining"] else "cordoned" if n["cordoned"] else "ready"
        rows.append([n["id"], n["address"], _age(n["heartbeat_age_s"]), mark, _resources(n)])
    return rows


# ------------------------------------------------------------------- commands


def cluster_status(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    status = client.cluster()
    if out.as_json:
        out.data(status)
        return 0
    out.line(f"scheduler leader: {status.get('leader') or 'none'}")
    out.line()
    out.table(
        ["node", "address", "heartbeat", "state", "resources"],
        _node_rows(status["nodes"]),
        "no nodes: start one with `nebula node`",
    )
    out.line()
    states = {p["id"]: p for p in status["placements"]}
    out.table(
        ["model", "node", "url", "state", "in-flight"],
        [
            [
                e["model"],
                e["node"],
                e["url"],
                (states.get(e["placement_id"]) or {}).get("state") or "Healthy",
                e["in_flight"],
            ]
            for e in status["endpoints"]
        ],
        "no healthy endpoints",
    )
    return 0


def model_list(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    models = client.models()
    if out.as_json:
        out.data(models)
        return 0
    out.table(
        ["id", "model", "status", "ready", "message"],
        [
            [
                m["id"],
                m["model"],
                m["status"],
                f"{m['ready_replicas']}/{m['replicas']}",
                m["message"][:60],
            ]
            for m in models
        ],
        "no models loaded: `nebula-cli catalog list`, then `nebula-cli model load NAME`",
    )
    return 0


def _wait(
    client: AdminClient,
    ref: str,
    out: Output,
    timeout: float,
    done: Callable[[dict[str, Any] | None], bool],
) -> None:
    """Poll until `done`, printing each new status; fail on Failed."""
    deadline = time.monotonic() + timeout
    seen = None
    while True:
        try:
            current: dict[str, Any] | None = client.show(ref)
        except ClientError as exc:
            if exc.status != 404:
                raise
            current = None
        if current is not None:
            key = (current["status"], current["message"])
            if key != seen and not out.as_json:
                out.line(f"  {out.paint(current['status'])}: {current['message']}")
            seen = key
            if current["status"] == "Failed":
                raise WaitFailed(_failed(current))
        if done(current):
            return
        if time.monotonic() > deadline:
            raise WaitTimeout(f"gave up waiting for {ref} after {timeout:.0f}s")
        time.sleep(0.5)


def _failed(model: dict[str, Any]) -> str:
    """One line that says what failed, then the engine's last log lines, indented."""
    first, _, log = model["message"].partition("\n")
    text = f"{model['model']} failed: {first}"
    if log.strip():
        text += "\n" + "\n".join("    " + line for line in log.strip().splitlines())
    return text


def model_load(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    created = client.load(
        args.name, args.replicas, gpu_memory_utilization=args.gpu_memory_utilization
    )
    if not out.as_json:
        out.line(f"loading {created['model']} as {created['id']} ({created['replicas']} replicas)")
    if args.wait:
        _wait(
            client, created["id"], out, args.timeout, lambda m: bool(m and m["status"] == "Ready")
        )
        created = client.show(created["id"])
        if not out.as_json:
            out.line(f"{created['model']} is Ready")
    if out.as_json:
        out.data(created)
    return 0


def model_wait(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    """Until every named model is Ready, with a progress line whenever something changes."""
    deadline = time.monotonic() + args.timeout
    last = ""
    while True:
        models = {}
        for m in client.models():
            models[m["model"]] = models[m["id"]] = m
        missing = [ref for ref in args.refs if ref not in models]
        if missing:
            raise ClientError(f"not loaded: {', '.join(missing)}", 404)
        failed = [models[ref] for ref in args.refs if models[ref]["status"] == "Failed"]
        if failed:
            raise WaitFailed(_failed(failed[0]))
        line = "  ".join(
            f"{models[ref]['model']} {models[ref]['status']} "
            f"{models[ref]['ready_replicas']}/{models[ref]['replicas']}"
            for ref in args.refs
        )
        if line != last and not out.as_json:
            out.line(f"  {time.strftime('%H:%M:%S')}  {line}")
        last = line
        if all(models[ref]["status"] == "Ready" for ref in args.refs):
            if out.as_json:
                out.data([models[ref] for ref in args.refs])
            return 0
        if time.monotonic() > deadline:
            raise WaitTimeout(f"gave up waiting after {args.timeout:.0f}s: {line}")
        time.sleep(1.0)


def model_unload(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    drain = 0.0 if args.now else args.drain_timeout
    unloading = client.unload(args.ref, drain)
    if not out.as_json:
        out.line(f"unloading {unloading['model']} ({unloading['id']})")
    if args.wait:
        _wait(client, unloading["id"], out, args.timeout, lambda m: m is None)
        if not out.as_json:
            out.line(f"{unloading['model']} is gone")
    if out.as_json:
        out.data({**unloading, "gone": bool(args.wait)})
    return 0


def model_show(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    m = client.show(args.ref)
    if out.as_json:
        out.data(m)
        return 0
    spec = m["spec"]
    out.line(f"{m['model']}  ({m['id']})")
    out.line(f"  status    {out.paint(m['status'])}: {m['message']}")
    out.line(f"  replicas  {m['replicas']}")
    memory = (
        f"{spec['gpu_memory_utilization']} of a GPU" if spec["gpu_memory_utilization"] else ""
    ) or f"{spec['cpu_memory_gib']} GiB RAM"
    out.line(f"  engine    {spec['engine']} {spec['model']} ({spec['task']}, {memory})")
    out.line()
    out.table(
        ["placement", "node", "devices", "port", "desired", "state", "pid", "restarts"],
        [
            [
                p["id"],
                p["node"],
                ",".join(map(str, p["devices"])) or "cpu",
                p["port"],
                p["desired"],
                p["state"] or "-",
                p["pid"] or "-",
                p["restarts"],
            ]
            for p in m["placements"]
        ],
        "no placements",
    )
    out.line()
    out.line("events:")
    for e in m["events"][-15:]:
        stamp = time.strftime("%H:%M:%S", time.localtime(e["at"]))
        out.line(f"  {stamp}  {e['message']}")
    return 0


def node_list(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    nodes = client.nodes()
    if out.as_json:
        out.data(nodes)
        return 0
    out.table(
        ["node", "address", "heartbeat", "state", "resources"],
        _node_rows(nodes),
        "no nodes: start one with `nebula node`",
    )
    return 0


def node_action(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    result = client.node_action(args.node, args.action)
    if out.as_json:
        out.data(result)
    else:
        done = {"cordon": "cordoned", "uncordon": "uncordoned", "drain": "draining"}
        out.line(f"node {args.node} {done[args.action]}")
    return 0


def catalog_list(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    models = client.catalog()
    if out.as_json:
        out.data(models)
        return 0
    out.table(
        ["name", "task", "engine", "gpu", "cpu gib", "tp", "model"],
        [
            [
                m["name"],
                m["task"],
                m["engine"],
                m["gpu_memory_utilization"] or "-",
                m["cpu_memory_gib"] or "-",
                m["tensor_parallel_size"],
                m["model"],
            ]
            for m in models
        ],
        "the catalog is empty",
    )
    return 0


# --------------------------------------------------------------------- parser


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Raises instead of exiting, so nebula-shell can reuse the commands."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message}")


def parser(prog: str = "nebula-cli") -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    p = _Parser(
        prog=prog,
        description="Operate a Nebula cluster through its admin API. The admin key comes from "
        "NEBULA_ADMIN_KEY or the config file.",
        parents=[common],
    )
    p.add_argument("--url", help="router URL (default NEBULA_URL, else http://127.0.0.1:8080)")
    p.add_argument("--version", action="version", version=f"nebula-cli {__version__}")
    groups = p.add_subparsers(dest="group", required=True, metavar="GROUP", parser_class=_Parser)

    cluster = groups.add_parser("cluster", help="the cluster as a whole")
    cluster_sub = cluster.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cluster_sub.add_parser("status", parents=[common], help="nodes, GPUs, endpoints").set_defaults(
        run=cluster_status
    )

    model = groups.add_parser("model", help="load, unload, list, show models")
    model_sub = model.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_sub.add_parser("list", parents=[common], help="loaded models").set_defaults(
        run=model_list
    )
    load = model_sub.add_parser("load", parents=[common], help="load a catalog model")
    load.add_argument("name", help="catalog name (see `catalog list`)")
    load.add_argument("--replicas", type=int, default=1, help="engines to run (default 1)")
    load.add_argument(
        "--gpu-memory-utilization", type=float, help="fraction of each GPU, overriding the catalog"
    )
    load.add_argument("--wait", action="store_true", help="show progress until Ready")
    load.add_argument("--timeout", type=float, default=900, help="--wait limit in seconds")
    load.set_defaults(run=model_load)
    wait = model_sub.add_parser("wait", parents=[common], help="wait until models are Ready")
    wait.add_argument("refs", nargs="+", metavar="NAME|ID")
    wait.add_argument("--timeout", type=float, default=900, help="limit in seconds")
    wait.set_defaults(run=model_wait)
    unload = model_sub.add_parser("unload", parents=[common], help="drain, stop and free a model")
    unload.add_argument("ref", metavar="NAME|ID")
    unload.add_argument("--wait", action="store_true", help="show progress until gone")
    drain = unload.add_mutually_exclusive_group()
    drain.add_argument(
        "--drain-timeout", type=float, metavar="SECONDS",
        help="longest wait for in-flight requests before stopping (default: the catalog's "
        "drain_timeout_s for the model, else the node's, 600 s)",
    )  # fmt: skip
    drain.add_argument(
        "--now", action="store_true", help="stop at once: in-flight answers are cut off"
    )
    unload.add_argument("--timeout", type=float, default=300, help="--wait limit in seconds")
    unload.set_defaults(run=model_unload)
    show = model_sub.add_parser("show", parents=[common], help="placements, states, events")
    show.add_argument("ref", metavar="NAME|ID")
    show.set_defaults(run=model_show)

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

    catalog = groups.add_parser("catalog", help="the models that can be loaded")
    catalog_sub = catalog.add_subparsers(dest="command", required=True, metavar="COMMAND")
    catalog_sub.add_parser("list", parents=[common], help="catalog models").set_defaults(
        run=catalog_list
    )
    return p


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

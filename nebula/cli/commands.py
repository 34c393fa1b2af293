"""What each nebula-cli command does, over the admin API (nebula-shell runs the same).

Each takes the admin client, the parsed arguments and an `Output`, and returns
the exit code; an error the API gives is raised as `ClientError`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from nebula.cli.client import AdminClient, ClientError
from nebula.cli.console import Output, node_rows
from nebula.durations import show_duration
from nebula.errors import NebulaError
from nebula.replicas import show_replicas


class WaitFailed(NebulaError):
    pass


class WaitTimeout(NebulaError):
    pass


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
        node_rows(status["nodes"]),
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
    out.line()
    out.table(
        ["model", "status", "keep-alive", "idle", "last used"],
        [[m["model"], m["status"], *_use(m)] for m in status["models"]],
        "no models loaded",
    )
    return 0


def _use(m: dict[str, Any]) -> list[str]:
    """Keep-alive, idle time and last use, as columns."""
    idle = "-" if m.get("idle_s") is None else show_duration(m["idle_s"])
    used = m.get("last_used")
    ago = "never" if not used else show_duration(max(0.0, time.time() - used)) + " ago"
    return [m.get("keep_alive", "never"), idle, ago]


def model_list(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    models = client.models()
    if out.as_json:
        out.data(models)
        return 0
    out.table(
        ["id", "model", "status", "ready", "keep-alive", "idle", "last used", "message"],
        [
            [
                m["id"],
                m["model"],
                m["status"],
                f"{m['ready_replicas']}/{m['replicas']}",
                *_use(m),
                m["message"][:50],
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
        args.name,
        args.replicas,
        gpu_memory_utilization=args.gpu_memory_utilization,
        keep_alive=args.keep_alive,
    )
    if not out.as_json:
        count = show_replicas(created["min_replicas"], created["max_replicas"])
        following = ", following the load" if created["autoscaled"] else ""
        out.line(f"loading {created['model']} as {created['id']} ({count} replicas{following})")
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
    scaling = ""
    if m.get("autoscaled"):
        scaling = f" (following the load within {m['min_replicas']}..{m['max_replicas']})"
    out.line(f"  replicas  {m['replicas']}{scaling}")
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


def model_pin(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    pinned = args.command == "pin"
    found = client.pin(args.ref, pinned, None if pinned else args.keep_alive)
    if out.as_json:
        out.data(found)
    elif pinned:
        out.line(f"{found['model']} is pinned: never unloaded when idle, never evicted")
    else:
        out.line(f"{found['model']} unloads after {found['keep_alive']} idle")
    return 0


def node_list(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    nodes = client.nodes()
    if out.as_json:
        out.data(nodes)
        return 0
    out.table(
        ["node", "address", "heartbeat", "state", "resources"],
        node_rows(nodes),
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

"""nebula-cli's `key` commands: client keys with their scopes, and token usage.

nebula-cli key create NAME [--models GLOB,...] [--no-on-demand] [--priority P]
                           [--rate R] [--budget TOKENS [--period day|month]]
nebula-cli key list | show NAME | delete NAME
nebula-cli key usage [--key NAME] [--model NAME] [--days N]
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from nebula.cli.client import AdminClient
from nebula.cli.console import Output


def add_commands(groups: Any, common: argparse.ArgumentParser) -> None:
    """The `key` group, on nebula-cli's parser."""
    key = groups.add_parser("key", help="client keys, their scopes and token usage")
    sub = key.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create = sub.add_parser(
        "create",
        parents=[common],
        help="create a client key for /v1 (shown once: store it)",
        description="Create a client key. Without options it may use every model, load "
        "models on demand, at any rate, with no token budget.",
    )
    create.add_argument("name", help="1-64 letters, digits, '.', '_' or '-'")
    create.add_argument(
        "--models",
        metavar="GLOB,...",
        help='models it may use, names or globs ("chat-*"), comma-separated; default: all',
    )
    create.add_argument(
        "--no-on-demand",
        dest="on_demand",
        action="store_false",
        help="its requests never load a model that is not loaded (403 instead)",
    )
    create.add_argument(
        "--priority", choices=("low", "normal", "high"), help="its band when requests queue"
    )
    create.add_argument("--rate", type=float, metavar="PER_S", help="requests per second")
    create.add_argument(
        "--budget", type=int, metavar="TOKENS", help="prompt + completion tokens per period"
    )
    create.add_argument(
        "--period", choices=("day", "month"), help="the budget's period, UTC (default: day)"
    )
    create.set_defaults(run=key_create)
    sub.add_parser("list", parents=[common], help="every client key").set_defaults(run=key_list)
    show = sub.add_parser("show", parents=[common], help="a key's scope and its spend this period")
    show.add_argument("name", metavar="NAME")
    show.set_defaults(run=key_show)
    delete = sub.add_parser("delete", parents=[common], help="revoke a key on every router")
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(run=key_delete)
    usage = sub.add_parser("usage", parents=[common], help="tokens per key, model and UTC day")
    usage.add_argument("--key", metavar="NAME", help="only this key")
    usage.add_argument("--model", metavar="NAME", help="only this model")
    usage.add_argument("--days", type=int, default=7, help="today and the days before (7)")
    usage.set_defaults(run=key_usage)


def key_create(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    fields: dict[str, Any] = {"name": args.name, "on_demand": args.on_demand}
    if args.models:
        fields["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for name, value in (
        ("priority", args.priority),
        ("rate_per_s", args.rate),
        ("token_budget", args.budget),
        ("budget_period", args.period),
    ):
        if value is not None:
            fields[name] = value
    created = client.create_key(fields)
    if out.as_json:
        out.data(created)
        return 0
    out.line(f"key {created['name']} created: {_scope(created)}")
    out.line(f"  {created['key']}")
    out.line("it is shown this once (only its hash is kept): store it now")
    return 0


def _scope(key: dict[str, Any]) -> str:
    budget = key.get("token_budget")
    return ", ".join(
        [
            "models " + ",".join(key["models"]) if key.get("models") else "every model",
            "on-demand loads" if key.get("on_demand", True) else "no on-demand loads",
            f"priority {key.get('priority', 'normal')}",
            f"{key['rate_per_s']:g} req/s" if key.get("rate_per_s") else "no rate limit",
            f"{budget} tokens/{key.get('budget_period', 'day')}" if budget else "no budget",
        ]
    )


def key_list(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    keys = client.api_keys()
    if out.as_json:
        out.data(keys)
        return 0
    out.table(
        ["name", "scope", "created"],
        [[k["name"], _scope(k), _when(k.get("created_at"))] for k in keys],
        "no stored keys: `nebula-cli key create NAME`",
    )
    return 0


def key_show(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    key = client.show_key(args.name)
    if out.as_json:
        out.data(key)
        return 0
    out.line(f"key {key['name']}: {_scope(key)}")
    out.line(f"created {_when(key.get('created_at'))}")
    spent = f"{key['spent']} tokens spent in {key['period']}"
    if key.get("token_budget"):
        spent += f" of {key['token_budget']}; resets {_when(key['resets_at'])}"
    out.line(spent)
    return 0


def key_delete(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    done = client.delete_key(args.name)
    if out.as_json:
        out.data(done)
    else:
        out.line(f"key {args.name} deleted: every router refuses it from its next refresh")
    return 0


def key_usage(client: AdminClient, args: argparse.Namespace, out: Output) -> int:
    report = client.usage(args.days, args.key, args.model)
    if out.as_json:
        out.data(report)
        return 0
    rows = report["usage"]
    out.table(
        ["day", "key", "model", "requests", "prompt", "completion", "total"],
        [
            [
                r["day"],
                r["key"],
                r["model"],
                r["requests"],
                r["prompt_tokens"],
                r["completion_tokens"],
                r["total_tokens"],
            ]
            for r in rows
        ],
        f"no usage in the last {args.days} day(s)",
    )
    return 0


def _when(at: float | None) -> str:
    if not at:
        return "-"
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

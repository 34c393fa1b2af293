"""`python -m nebula.testengine`: the command line (see the package's doc)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from aiohttp import web

from nebula.engine_flags import API_FLAGS
from nebula.testengine import Behaviour, make_app
from nebula.testengine import __doc__ as DOC
from nebula.testengine.prompts import BLOCK_CHARS, CACHE_BLOCKS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nebula-testengine", description=(DOC or "").split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0: any free port (see --port-file)")
    p.add_argument("--port-file", default="", help="write the port listened on here, once bound")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--api-key", default=os.environ.get("NEBULA_TEST_ENGINE_API_KEY", ""))
    p.add_argument("--dimensions", type=int, default=384, help="embedding size")
    p.add_argument("--startup-delay-s", type=float, default=0.0)
    p.add_argument("--fail-start", default="", help="print this and exit 1 at start")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--prefill-ms-per-kchar", type=float, default=0.0)
    p.add_argument("--token-ms", type=float, default=0.0, help="generation time per token")
    p.add_argument("--metrics-delay-ms", type=float, default=0.0, help="a slow /metrics")
    p.add_argument("--max-num-seqs", type=int, default=0, help="running at most (0: no limit)")
    p.add_argument("--kv-events-config", default="", help="publish KV-cache events, as vLLM")
    p.add_argument(
        "--cache-blocks",
        type=int,
        default=CACHE_BLOCKS,
        help=f"prefix cache size in blocks of {BLOCK_CHARS} characters",
    )
    # vLLM's other flags that the admin API may set change sizes, not behaviour, here:
    # accepted and ignored, so a load with overrides runs as it would on vLLM.
    for flag, check in API_FLAGS.items():
        if flag in ("--max-num-seqs", "--kv-events-config"):
            continue  # taken above, with vLLM's meaning
        if check is None:
            p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    print(f"test engine for {args.model} starting on {args.host}:{args.port}", flush=True)
    if args.fail_start:
        print(args.fail_start, file=sys.stderr, flush=True)
        sys.exit(1)
    time.sleep(args.startup_delay_s)
    behaviour = Behaviour(
        chunk_delay_ms=args.chunk_delay_ms,
        tokens=args.tokens,
        prefill_ms_per_kchar=args.prefill_ms_per_kchar,
        token_ms=args.token_ms,
        metrics_delay_ms=args.metrics_delay_ms,
        max_running=args.max_num_seqs,
        cache_blocks=args.cache_blocks,
    )
    app = make_app(
        args.model,
        api_key=args.api_key,
        dimensions=args.dimensions,
        behaviour=behaviour,
        kv_events_config=args.kv_events_config,
    )
    # Like vLLM, a stopped engine does not finish its answers: on SIGTERM, in-flight
    # requests are cut after a moment (aiohttp would otherwise wait a minute for them).
    # Like vLLM too, a request whose client leaves is aborted (handler cancellation).
    web.run_app(
        app,
        sock=bound(args.host, args.port, args.port_file),
        print=None,
        access_log=None,
        shutdown_timeout=0.5,
        handler_cancellation=True,
    )


def bound(host: str, port: int, port_file: str) -> socket.socket:
    """The listening socket, bound here so that port 0 works and no other process can
    take the port between its choice and its use; its port written to `port_file`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    if port_file:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(str(sock.getsockname()[1]))
        tmp.replace(port_file)  # whole or absent: a reader never sees half a number
    return sock


if __name__ == "__main__":
    main()

"""The router's processes: one, or `--workers N` that share the port.

N workers each bind the port with SO_REUSEPORT; the kernel spreads connections
across them. Their Prometheus metrics are summed over them (`tally` for the
per-request ones, prometheus_client's multiprocess mode for the rest). A worker
that dies is restarted with a growing back-off while the others keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from nebula.exposure import check_exposure
from nebula.process import (
    STOP_STEP_S,
    bounded,
    die_with_parent,
    run_async,
    setup_logging,
    stop_signal,
    wait_event,
)
from nebula.router.app import DRAIN_GRACE_S, build_app
from nebula.router.protocol import Runner
from nebula.settings import Settings

log = logging.getLogger(__name__)


def _socket(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.router_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.router_host, settings.router_port))
    return sock


def _bind(settings: Settings) -> socket.socket:
    sock = _socket(settings)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _any_free_port(settings: Settings) -> tuple[Settings, socket.socket | None]:
    """With `router_port` 0, the port the kernel gives, held by a socket that is bound
    but never listens (so it takes no connections) while the workers bind it too:
    no other process can take it between the choice and the workers' bind."""
    if settings.router_port != 0:
        return settings, None
    holder = _socket(settings)
    port = holder.getsockname()[1]
    return settings.model_copy(update={"router_port": port}), holder


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The router's TLS context when it has a certificate; SIGHUP loads the files again
    (`reload_on_sighup`), for the connections made from then on."""
    if settings.tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


def reload_on_sighup(settings: Settings, context: ssl.SSLContext) -> None:
    def reload() -> None:
        try:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError) as exc:
            log.error("SIGHUP: the certificate was not reloaded (%s); serving the old one", exc)
            return
        log.info("SIGHUP: certificate %s reloaded", settings.tls_cert_file)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


async def _serve_one(settings: Settings) -> None:
    context = tls_context(settings)
    app = build_app(settings)
    runner = Runner(
        app,
        access_log=None,
        handle_signals=False,
        # A client that leaves cancels its handler, and so its upstream request: the
        # engine sees the connection close and stops generating (aiohttp's default,
        # since 3.9, lets the handler run on for nobody).
        handler_cancellation=True,
        shutdown_timeout=settings.router_drain_s + DRAIN_GRACE_S,
    )
    await runner.setup()
    site = web.SockSite(runner, _bind(settings), ssl_context=context)
    await site.start()
    if context is not None:
        reload_on_sighup(settings, context)
    log.info(
        "router listening on %s://%s:%d (pid %d)",
        "https" if context else "http",
        settings.router_host,
        settings.router_port,
        os.getpid(),
    )
    async with stop_signal() as stop:
        await stop.wait()
    log.info("stopping: in-flight requests get up to %gs", settings.router_drain_s)
    # aiohttp waits up to its shutdown timeout for in-flight requests, then as long
    # again for those it cancelled; the app's own cleanup is bounded by STOP_STEP_S.
    bound = 2 * (settings.router_drain_s + DRAIN_GRACE_S) + STOP_STEP_S + 1.0
    await bounded("router shutdown", runner.cleanup(), bound)


def _worker(settings: Settings, parent: int) -> None:
    # This worker gets SIGTERM when the process that started it dies.
    die_with_parent(parent=parent, exit_code=0)
    setup_logging(settings.log_level)
    run_async(_serve_one(settings))


RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)


async def serve(settings: Settings) -> None:
    await check_exposure(settings)
    settings, holder = _any_free_port(settings)
    if settings.router_port_file is not None:
        written = settings.router_port_file.with_suffix(".tmp")
        written.write_text(str(settings.router_port))
        written.replace(settings.router_port_file)  # whole, or not there yet
    try:
        await _serve(settings)
    finally:
        if holder is not None:
            holder.close()


async def _serve(settings: Settings) -> None:
    if settings.router_workers == 1:
        await _serve_one(settings)
        return
    ctx = multiprocessing.get_context("spawn")
    me = os.getpid()

    def start(i: int) -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=_worker, args=(settings, me), name=f"router-{i}")
        proc.start()
        return proc

    procs = [start(i) for i in range(settings.router_workers)]
    if settings.tls_cert_file is not None:
        # Each worker holds its own copy of the certificate: pass the signal on.
        def pass_on() -> None:
            for proc in procs:
                if proc.pid and proc.is_alive():
                    os.kill(proc.pid, signal.SIGHUP)

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, pass_on)
    async with stop_signal() as stop:
        await _supervise(procs, start, stop)


async def _supervise(
    procs: list[multiprocessing.process.BaseProcess],
    start: Callable[[int], multiprocessing.process.BaseProcess],
    stop: asyncio.Event,
) -> None:
    """Restart a worker that dies, with a growing back-off, until `stop`; then stop all."""
    crashes = [0] * len(procs)
    restart_at = [0.0] * len(procs)
    try:
        while not stop.is_set():
            await wait_event(stop, 0.5)
            now = time.monotonic()
            for i, proc in enumerate(procs):
                if proc.is_alive() or stop.is_set():
                    continue
                if not restart_at[i]:
                    # A worker died: the others keep serving; start another after a
                    # back-off that grows if it keeps dying.
                    delay = RESTART_BACKOFF_S[min(crashes[i], len(RESTART_BACKOFF_S) - 1)]
                    log.error(
                        "router worker %s died (exit %s); restarting in %gs",
                        proc.name,
                        proc.exitcode,
                        delay,
                    )
                    crashes[i] += 1
                    restart_at[i] = now + delay
                elif now >= restart_at[i]:
                    restart_at[i] = 0.0
                    procs[i] = start(i)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)

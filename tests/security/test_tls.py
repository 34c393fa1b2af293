"""TLS on both of the router's sides: clients reach it over HTTPS (the certificate
reloaded on SIGHUP), and it reaches Redis over TLS (rediss://). Both failed on the
code before (30e7774 and after): the router served plain HTTP only, and no setting
named the CA that signed Redis's certificate."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from harness.cluster import wait_for
from harness.processes import (
    EngineProcess,
    RedisServer,
    RouterProcess,
    free_port,
    http_bytes,
    stop,
    wait_for_port,
)
from harness.tls import Certificates, make_certificates
from nebula.errors import StateUnavailable
from nebula.store import State
from tests.security.conftest import ADMIN_KEY, CHAT, CLIENT_KEY, publish, router_env


def https_url(router: RouterProcess) -> str:
    return f"https://127.0.0.1:{router.port}"


def served_certificate(port: int, ca: Path) -> bytes:
    """The DER certificate a new TLS connection to `port` is shown (checked with `ca`)."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_openai_client_over_https_and_a_certificate_reloaded_on_sighup(
    state: State,
    redis_url: str,
    tmp_path: Path,
    engines: Callable[..., EngineProcess],
    workers: int,
) -> None:
    first = make_certificates(tmp_path / "tls", "router-1")
    env = router_env(NEBULA_TLS_CERT_FILE=str(first.cert), NEBULA_TLS_KEY_FILE=str(first.key))
    router = RouterProcess(redis_url, tmp_path, workers, **env)
    try:
        await publish(state, engines(CHAT), "p-chat", "chat")
        client = openai.OpenAI(
            base_url=https_url(router) + "/v1",
            api_key=CLIENT_KEY,
            max_retries=0,
            http_client=openai.DefaultHttpxClient(
                verify=ssl.create_default_context(cafile=str(first.ca))
            ),
        )

        async def answers() -> bool:
            try:
                reply = client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": "over tls"}]
                )
            except openai.APIStatusError as exc:
                print("not yet:", exc.status_code, exc.message)
                return False
            return (reply.choices[0].message.content or "").strip() == "echo: over tls"

        await wait_for(answers, 15, "an answer over HTTPS")
        stream = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "a b c"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.strip() == "echo: a b c"
        # Plain HTTP on the same port is not served.
        plain = openai.OpenAI(base_url=router.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            plain.models.list()
        # A new certificate in the same files, then SIGHUP: new connections get it.
        assert served_certificate(router.port, first.ca) == der_of(first.cert)
        second = make_certificates(tmp_path / "tls", "router-2")
        first.cert.write_bytes(second.cert.read_bytes())
        first.key.write_bytes(second.key.read_bytes())
        router.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            # Several connections: with 2 workers the kernel spreads them across both.
            served = {served_certificate(router.port, first.ca) for _ in range(8)}
            return served == {der_of(second.cert)}

        await wait_for(reloaded, 15, "the new certificate served")
        assert await answers()
        assert "certificate" in router.log.read_text() and "reloaded" in router.log.read_text()
        client.close()
        plain.close()
    finally:
        router.stop()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Certificates]]:
    certs = make_certificates(tmp_path / "redis-tls", "redis")
    port = free_port()
    server = RedisServer(
        tmp_path / "redis-tls-data",
        port=port,
        extra=(
            "--tls-port", str(port), "--port", "0",
            "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key),
            "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
        ),
    )  # fmt: skip
    server.start()
    yield server, certs
    server.stop()


async def test_rediss_to_a_real_tls_redis_server(
    tls_redis: tuple[RedisServer, Certificates], tmp_path: Path
) -> None:
    server, certs = tls_redis
    url = f"rediss://127.0.0.1:{server.port}/0"
    async with State(url, tls_ca_file=str(certs.ca)) as state:
        secret = await state.api_keys.create("over-tls")
        assert [k.name for k in await state.api_keys.all()] == ["over-tls"]
    # Without the CA the server's certificate is not trusted; without TLS, no answer.
    for wrong, ca in ((url, None), (url.replace("rediss://", "redis://"), None)):
        async with State(wrong, tls_ca_file=ca) as state:
            with pytest.raises(StateUnavailable):
                await state.api_keys.all()
    # A whole router on it: its keys, its table, its rate limits and budgets.
    router = RouterProcess(
        url,
        tmp_path,
        **router_env(NEBULA_REDIS_TLS_CA_FILE=str(certs.ca), NEBULA_API_KEYS=""),
    )
    try:
        deadline = time.monotonic() + 15
        with openai.OpenAI(base_url=router.url + "/v1", api_key=secret, max_retries=0) as client:
            while True:
                try:
                    assert client.models.list().data == []
                    break
                except openai.AuthenticationError:
                    assert time.monotonic() < deadline, router.log.read_text()[-2000:]
                    time.sleep(0.2)
        status, _, body = http_bytes("GET", router.url + "/admin/keys", key=ADMIN_KEY)
        assert status == 200 and [k["name"] for k in json.loads(body)["keys"]] == ["over-tls"]
    finally:
        router.stop()


async def test_rediss_sentinel_follows_a_master_over_tls(
    tls_redis: tuple[RedisServer, Certificates], tmp_path: Path
) -> None:
    """The TLS form of the Sentinel URL: TLS to the Sentinel, and to the master it names."""
    server, certs = tls_redis
    port = free_port()
    folder = tmp_path / "sentinel"
    folder.mkdir()
    conf = folder / "sentinel.conf"
    conf.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ndir {folder}\n"
        f"tls-cert-file {certs.cert}\ntls-key-file {certs.key}\ntls-ca-cert-file {certs.ca}\n"
        "tls-auth-clients no\ntls-replication yes\n"
        f"sentinel monitor nebula 127.0.0.1 {server.port} 1\n"
    )
    binary = shutil.which("redis-sentinel")
    assert binary is not None, "redis-sentinel is not installed; shell/test installs it"
    with (folder / "sentinel.log").open("ab") as log:
        sentinel = subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        url = f"rediss+sentinel://127.0.0.1:{port}/nebula/0"
        async with State(url, tls_ca_file=str(certs.ca)) as state:
            deadline = time.monotonic() + 15
            while True:  # the Sentinel names the master once it has checked it
                try:
                    await state.api_keys.create("via-sentinel")
                    break
                except StateUnavailable:
                    assert time.monotonic() < deadline, (folder / "sentinel.log").read_text()
                    await asyncio.sleep(0.2)
            assert await state.connection.master_address() == f"127.0.0.1:{server.port}"
            assert [k.name for k in await state.api_keys.all()] == ["via-sentinel"]
    finally:
        stop(sentinel)


async def test_nebula_cli_over_https_trusts_the_ca_named_by_ssl_cert_file(
    redis_url: str, tmp_path: Path
) -> None:
    """docs/cli.md's way to reach an HTTPS router signed by a private CA, as written."""
    certs = make_certificates(tmp_path / "tls", "router")
    env = router_env(NEBULA_TLS_CERT_FILE=str(certs.cert), NEBULA_TLS_KEY_FILE=str(certs.key))
    router = RouterProcess(redis_url, tmp_path, **env)
    try:
        base = {
            "PATH": "/usr/bin:/bin",
            "NEBULA_URL": https_url(router),
            "NEBULA_ADMIN_KEY": ADMIN_KEY,
        }

        def cli(**more: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "nebula.cli", "key", "list"],
                env={**base, **more},
                capture_output=True,
                text=True,
                timeout=60,
            )

        untrusted = cli()
        assert untrusted.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        trusted = cli(SSL_CERT_FILE=str(certs.ca))
        assert trusted.returncode == 0, trusted.stderr
        assert "no stored keys" in trusted.stdout
    finally:
        router.stop()

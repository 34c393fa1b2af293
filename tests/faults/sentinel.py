"""A Redis master, one replica and three real redis-sentinel processes on loopback,
with short Sentinel timings (a master is down after 1 s, not Sentinel's 30 s)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from harness.processes import RedisServer, free_port, stop, wait_for_port

MASTER_NAME = "nebula"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


class SentinelTopology:
    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError("redis-sentinel is not installed; run shell/test, which installs it")
        self.folder = folder
        # No 5 s wait before a replica's first full sync (Redis 7's default).
        fast = ("--repl-diskless-sync-delay", "0")
        self.servers = [RedisServer(folder / "redis-a", aof=True, extra=fast)]
        self.servers.append(
            RedisServer(
                folder / "redis-b",
                aof=True,
                extra=(*fast, "--replicaof", "127.0.0.1", str(self.servers[0].port)),
            )
        )
        for server in self.servers:
            server.start()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        for i, port in enumerate(self.sentinel_ports):
            conf = folder / f"sentinel-{i}" / "sentinel.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {conf.parent}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.servers[0].port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            with (conf.parent / "sentinel.log").open("ab") as log:
                self.sentinels.append(
                    subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT)
                )
        try:
            for port in self.sentinel_ports:
                wait_for_port(port)
            self.wait(lambda: self._replicas_known() >= 1, 30, "Sentinels to see the replica")
            self.wait(self._in_sync, 30, "the replica's first sync")
        except BaseException:
            self.close()  # every process this started, by PID
            raise

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def sentinel(self, *args: str) -> object:
        client = redis.Redis(port=self.sentinel_ports[0], socket_timeout=3, decode_responses=True)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def master_port(self) -> int:
        _, port = self.sentinel("SENTINEL", "get-master-addr-by-name", MASTER_NAME)  # type: ignore[misc]
        return int(port)

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def _in_sync(self) -> bool:
        info = self.servers[1].command("INFO", "replication")
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _replicas_known(self) -> int:
        try:
            return len(self.sentinel("SENTINEL", "replicas", MASTER_NAME))  # type: ignore[arg-type]
        except redis.RedisError:
            return 0

    @staticmethod
    def wait(check: object, timeout: float, what: str) -> float:
        started = time.monotonic()
        while not check():  # type: ignore[operator]
            if time.monotonic() - started > timeout:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)
        return time.monotonic() - started

    def role(self, server: RedisServer) -> str:
        role = server.command("ROLE")[0]  # type: ignore[index]
        return role.decode() if isinstance(role, bytes) else str(role)

    def close(self) -> None:
        for proc in self.sentinels:
            stop(proc)
        for server in self.servers:
            server.stop()

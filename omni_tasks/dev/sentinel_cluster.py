"""A private Redis Sentinel setup on loopback: a master, a replica and three Sentinels
(`redis-server --sentinel`), each on a free port under one temporary directory. What the
Sentinel test and the fault bench fail over under live workers.

The Sentinels mark the master down after `down_after_ms` without an answer (1 s here,
30 s by Redis's default) and promote the replica; `url` is the
`sentinel://...;sentinel://...` URL omni-tasks, kombu and Celery take.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from omni_tasks.dev.redis_server import _free_port
from omni_tasks.dev.restartable_redis import redis_binary

MASTER_NAME = "mymaster"
SENTINELS = 3
QUORUM = 2


@dataclass
class _Server:
    port: int
    proc: subprocess.Popen[bytes]

    def client(self, timeout_s: float = 1.0) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout_s, decode_responses=True)


class SentinelCluster:
    """A master, a replica and three Sentinels; `start`, `kill_master`, `close`."""

    def __init__(self, db: int = 0, down_after_ms: int = 1000) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="omni-sentinel-")
        self.dir = Path(self._dir.name)
        self.db = db
        self.down_after_ms = down_after_ms
        self.servers: dict[int, _Server] = {}
        self.sentinels: list[_Server] = []

    @property
    def url(self) -> str:
        """`sentinel://127.0.0.1:p1/db;sentinel://127.0.0.1:p2;...` (kombu's spelling)."""
        parts = [f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels]
        parts[0] += f"/{self.db}"
        return ";".join(parts)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start everything and wait until the Sentinels know the replica and each
        other (a failover needs both)."""
        master = self._redis_server(_free_port(), [])
        self._redis_server(_free_port(), ["--replicaof", "127.0.0.1", str(master.port)])
        for _ in range(SENTINELS):
            self._sentinel(master.port)
        deadline = time.monotonic() + timeout_s
        while not self._settled():
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinels did not settle")
            time.sleep(0.2)

    def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                addr = sentinel.client().sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if addr:
                return int(addr[1])
        return None

    def kill_master(self) -> int:
        """SIGKILL the master (a crash: no shutdown, no last write); its port."""
        port = self.master_port()
        if port is None:
            raise RuntimeError("no master")
        server = self.servers.pop(port)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        return port

    def wait_promoted(self, old_port: int, timeout_s: float = 60.0) -> float:
        """Wait until the Sentinels name another master that answers as one; seconds."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            port = self.master_port()
            if port not in (None, old_port) and port in self.servers:
                try:
                    if self.servers[port].client().info("replication")["role"] == "master":
                        return time.monotonic() - start
                except redis.RedisError:
                    pass
            time.sleep(0.05)
        raise TimeoutError("no replica was promoted")

    def close(self) -> None:
        for server in [*self.sentinels, *self.servers.values()]:
            if server.proc.poll() is None:
                server.proc.terminate()
                try:
                    server.proc.wait(10)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait()
        self._dir.cleanup()

    def _redis_server(self, port: int, extra: list[str]) -> _Server:
        data = self.dir / str(port)
        data.mkdir()
        cmd = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
        cmd += ["--appendonly", "yes", "--save", "", *extra]
        server = _Server(port, subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        self.servers[port] = server
        return server

    def _sentinel(self, master_port: int) -> None:
        port = _free_port()
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        )
        cmd = [redis_binary(), str(conf), "--sentinel"]
        self.sentinels.append(_Server(port, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))

    def _settled(self) -> bool:
        try:
            for sentinel in self.sentinels:
                client = sentinel.client()
                replicas = client.sentinel_slaves(MASTER_NAME)
                others = client.sentinel_sentinels(MASTER_NAME)
                if len(others) < SENTINELS - 1 or not any(
                    "s_down" not in r["flags"] and r.get("master-link-status") == "ok"
                    for r in replicas
                ):
                    return False
        except redis.RedisError:
            return False
        return True

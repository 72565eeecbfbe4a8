"""Starting and stopping `celery -A omni_tasks worker` processes (demo, tests, bench).

A worker counts as ready once its heartbeat is in Redis: that happens at Celery's
`worker_ready`, after its engines have loaded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from omni_tasks.config import get_config
from omni_tasks.coordination.client import client_for


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (a worker's warm shutdown, the API's graceful one); SIGKILL if the process
    does not exit in `timeout_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class WorkerProcess:
    queue: str
    hostname: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    def is_ready(self) -> bool:
        """Whether the worker's heartbeat is in the Redis of this process's config."""
        client = client_for(get_config())
        return bool(client.exists(client.keyspace.worker(self.hostname)))

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker {self.hostname} exited with {self.proc.returncode}; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.2)
        raise TimeoutError(f"worker {self.hostname} not ready after {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 60.0) -> int:
        """Warm shutdown (SIGTERM); SIGKILL if it does not exit in time."""
        terminate(self.proc, timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(self.proc.returncode)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_worker(
    queue: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    name: str | None = None,
) -> WorkerProcess:
    """`celery -A omni_tasks worker -Q <queue>`, exactly as a user types it."""
    hostname = f"{name or queue}-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{hostname.split('@')[0]}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
    cmd = [sys.executable, "-m", "celery", "-A", "omni_tasks", "worker", "-Q", queue]
    cmd += ["-n", hostname, "--loglevel", "INFO", *(extra_args or [])]
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    return WorkerProcess(queue=queue, hostname=hostname, proc=proc, log_path=log_path, _log=log)


@dataclass
class ApiProcess:
    """`omni-tasks api --port <port>`, started as a user starts it."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until `/healthz` answers (it reads Redis: the API is up and connected)."""
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited with {self.proc.returncode}: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "healthz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"the API on port {self.port} did not answer")

    def stop(self, timeout_s: float = 30.0) -> None:
        terminate(self.proc, timeout_s)


def free_port() -> int:
    """A port nothing listens on here (the system's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_or_free(port: int) -> int:
    """`port` if nothing listens on it here, else a free one."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def start_api(log_dir: Path, port: int, env: dict[str, str] | None = None) -> ApiProcess:
    """`omni-tasks api --port <port>` on loopback, its output in `log_dir`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"api-{port}.log"
    cmd = [sys.executable, "-m", "omni_tasks.cli", "api", "--port", str(port)]
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return ApiProcess(port=port, proc=proc, log_path=log_path)

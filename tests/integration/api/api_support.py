"""What the HTTP API tests share: `omni-tasks api` processes started as a user starts
them, a webhook receiver, the token and secret. Test modules import the fixtures from
here (a second conftest.py would shadow the root one's `import conftest`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

TOKEN = "test-token-7f3a"
WEBHOOK_SECRET = "test-webhook-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ApiServer:
    """One `omni-tasks api` process."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    token: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def openai(self, **kwargs: Any) -> Any:
        import openai

        options = {"api_key": self.token or "unused", "max_retries": 0, "timeout": 120}
        return openai.OpenAI(base_url=f"{self.url}/v1", **{**options, **kwargs})

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the API on port {self.port} did not answer")

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_api(log_dir: Path, token: str | None = TOKEN, **env: str) -> ApiServer:
    """`omni-tasks api --port <free>` with the test environment plus `env`."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"api-{port}.log"
    variables = {**os.environ, "OMNI_API__WEBHOOK_SECRET": WEBHOOK_SECRET, **env}
    variables.pop("OMNI_API_TOKEN", None)
    if token:
        variables["OMNI_API_TOKEN"] = token
    cmd = [sys.executable, "-m", "omni_tasks.cli", "api", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        stdout=open(log_path, "wb"),  # noqa: SIM115 - the process owns it
        stderr=subprocess.STDOUT,
        env=variables,
        start_new_session=True,
    )
    server = ApiServer(port, proc, log_path, token)
    try:
        server.wait_ready()
    except Exception:
        server.stop(kill=True)
        raise
    return server


@pytest.fixture(scope="module")
def api_factory(run_dir: Path) -> Iterator[Any]:
    """Starts API processes for the module; stops them all at its end."""
    started: list[ApiServer] = []

    def make(token: str | None = TOKEN, **env: str) -> ApiServer:
        server = start_api(run_dir / "logs", token, **env)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """A local HTTP server that records the POSTs it gets; it answers 500 to the first
    `fail_first` of them."""

    fail_first: int = 0
    received: list[Delivery] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.received.append(Delivery(dict(self.headers), body))
                    failing = len(receiver.received) <= receiver.fail_first
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def for_job(self, job_id: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.received if d.json["job"]["id"] == job_id]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture()
def receiver() -> Iterator[WebhookReceiver]:
    found = WebhookReceiver().start()
    yield found
    found.stop()

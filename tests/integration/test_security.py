"""Security: Redis AUTH and TLS for the broker, the result backend and the coordination
client, with real password-protected (and TLS) `redis-server`s started here and real
workers serving through them; passwords never shown (worker logs, `omni-tasks status`,
errors, what Flower shows); Flower behind auth in compose and on loopback locally."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import MODELS_CACHE
from helpers import KEYS

from omni_tasks.coordination.client import redacted, to_redis_py_url
from omni_tasks.dev.launcher import WorkerProcess, start_worker
from omni_tasks.dev.redis_server import PrivateRedis, TlsFiles, _free_port, start_private_redis

PASSWORD = "s3cr3t-Pw-7f2a"
ROOT = Path(__file__).resolve().parents[2]
#: A producer in its own process, as an application runs: one probe, then what the
#: workers report of their config (what Flower's worker page shows).
PRODUCER = """
import json
from omni_tasks import app
from omni_tasks.tasks.definitions import probe
result = probe.delay(prompt="ping").get(timeout=120)
conf = app.control.inspect(timeout=5).conf()
print(json.dumps({"result": result, "conf": conf}, default=str))
"""


def run_python(code: str, env: dict[str, str], timeout_s: float = 180) -> Any:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )


def omni_tasks_cli(env: dict[str, str], *args: str) -> Any:
    code = f"from omni_tasks.cli import main; raise SystemExit(main({list(args)!r}))"
    return run_python(code, env)


def worker_env(url: str) -> dict[str, str]:
    """A light AR worker (the transformers engine) on `url`; the probe needs no more."""
    return {
        "OMNI_REDIS_URL": url,
        "OMNI_AR__ENGINE": "transformers",
        "OMNI_MODELS_DIR": str(MODELS_CACHE),
    }


def start_ready(url: str, log_dir: Path) -> WorkerProcess:
    """An AR worker on `url`, ready once its heartbeat is in that Redis."""
    worker = start_worker("ar", log_dir, env=worker_env(url), name="secure")
    client = redis.Redis.from_url(to_redis_py_url(url))
    deadline = time.monotonic() + 300
    while not client.exists(KEYS.worker(worker.hostname)):
        if worker.proc.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            pytest.fail(f"worker did not start on {redacted(url)}:\n{worker.log_tail()}")
        time.sleep(0.2)
    return worker


@pytest.fixture(scope="module")
def protected(tiny_llama_dir: Path, run_dir: Path) -> Iterator[tuple[PrivateRedis, WorkerProcess]]:
    server = start_private_redis(password=PASSWORD)
    worker = start_ready(server.url, run_dir / "security-logs")
    yield server, worker
    worker.stop()
    server.stop()
    assert PASSWORD not in worker.log_path.read_text(errors="replace")


def test_a_worker_on_a_password_url_serves_and_never_shows_it(protected) -> None:
    server, worker = protected
    assert f":{PASSWORD}@" in server.url
    out = run_python(PRODUCER, worker_env(server.url))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["result"]["text"] == "" and report["result"]["request_id"]
    # The coordination client authenticated too: the worker's heartbeat is in that Redis.
    assert redis.Redis.from_url(server.url).exists(KEYS.worker(worker.hostname))
    conf = report["conf"][worker.hostname]
    assert conf["broker_url"].startswith("redis://") and "**" in conf["broker_url"]
    assert PASSWORD not in out.stdout + out.stderr
    log = worker.log_path.read_text(errors="replace")
    assert "redis://:**@127.0.0.1" in log  # the banner shows the URL, masked
    assert PASSWORD not in log


def test_status_output_never_shows_the_password(protected) -> None:
    server, worker = protected
    out = omni_tasks_cli(worker_env(server.url), "status", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    hosts = [w["hostname"] for w in report["status"]["resource_status"]["workers"]]
    assert worker.hostname in hosts
    assert PASSWORD not in out.stdout + out.stderr
    tables = omni_tasks_cli(worker_env(server.url), "status")  # what people read
    assert tables.returncode == 0 and "Health:" in tables.stdout
    assert PASSWORD not in tables.stdout + tables.stderr


def test_a_wrong_password_is_a_clear_error_that_hides_it(protected) -> None:
    server, _ = protected
    wrong = server.url.replace(PASSWORD, "not-the-password")
    out = run_python(PRODUCER, worker_env(wrong), timeout_s=60)
    assert out.returncode != 0
    assert "invalid username-password pair" in out.stderr
    assert "not-the-password" not in out.stdout + out.stderr
    status = omni_tasks_cli(worker_env(wrong), "status")
    assert status.returncode == 2
    assert status.stderr.startswith("error: cannot use redis://:**@127.0.0.1")
    assert "invalid username-password pair" in status.stderr
    assert "not-the-password" not in status.stdout + status.stderr
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(wrong).ping()


def test_flower_asks_for_credentials_and_never_shows_the_password(protected) -> None:
    server, worker = protected
    port = _free_port()
    cmd = [sys.executable, "-m", "celery", "-A", "omni_tasks", "flower", "--address=127.0.0.1"]
    cmd += [f"--port={port}", "--basic-auth=ops:flower-pw", "--inspect_timeout=5000"]
    flower = subprocess.Popen(
        cmd,
        env={**os.environ, **worker_env(server.url)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_http(f"{base}/healthcheck")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/workers", timeout=10)
        assert refused.value.code == 401
        # Flower learns of workers by asking them (inspect): wait until it has our
        # worker's config, which names the broker and the result backend.
        deadline = time.monotonic() + 60
        known: dict[str, Any] = {}
        while "conf" not in known.get(worker.hostname, {}) and time.monotonic() < deadline:
            api = get_with_auth(f"{base}/api/workers?refresh=1", "ops:flower-pw")
            known = json.loads(api)
            time.sleep(0.5)
        conf = known[worker.hostname]["conf"]
        assert conf["broker_url"] == redacted(server.url).replace(":**@", ":********@")
        pages = ["/", "/workers", "/tasks", "/broker"]
        shown = api + "".join(get_with_auth(base + p, "ops:flower-pw") for p in pages)
        assert worker.hostname in shown
        assert PASSWORD not in shown
    finally:
        flower.terminate()
        output = flower.communicate(timeout=30)[0].decode(errors="replace")
    assert PASSWORD not in output


def wait_http(url: str, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except urllib.error.HTTPError:
            return True  # it answers
        except OSError:
            time.sleep(0.2)
    return False


def get_with_auth(url: str, user_pass: str) -> str:
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + b64encode(user_pass.encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return str(response.read().decode(errors="replace"))


def self_signed(directory: Path) -> TlsFiles:
    """A certificate for 127.0.0.1 that is its own CA."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return TlsFiles(cert=cert, key=key, ca=cert)


def start_tls_redis(directory: Path) -> PrivateRedis:
    """A password-protected Redis that speaks only TLS; skips when this one cannot."""
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("TLS test needs the openssl CLI and the system redis-server")
    try:
        return start_private_redis(password=PASSWORD, tls=self_signed(directory))
    except RuntimeError:
        pytest.skip("this redis-server does not start with --tls-port (built without TLS)")


@pytest.mark.slow
def test_rediss_with_a_password_serves_through_tls(tiny_llama_dir, tmp_path: Path) -> None:
    server = start_tls_redis(tmp_path)
    try:
        assert server.url.startswith(f"rediss://:{PASSWORD}@127.0.0.1:")
        worker = start_ready(server.url, tmp_path / "logs")
        try:
            out = run_python(PRODUCER, worker_env(server.url))
            assert out.returncode == 0, out.stderr[-2000:]
            assert json.loads(out.stdout.strip().splitlines()[-1])["result"]["request_id"]
        finally:
            worker.stop()
        assert "rediss://:**@127.0.0.1" in worker.log_path.read_text()
        assert PASSWORD not in worker.log_path.read_text() + out.stdout + out.stderr
        # Without the CA, the certificate is not trusted: TLS verifies by default.
        untrusted = server.url.split("?")[0]
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            redis.Redis.from_url(to_redis_py_url(untrusted), socket_timeout=5).ping()
        # Plain text to the TLS port is refused.
        plain = untrusted.replace("rediss://", "redis://")
        with pytest.raises(redis.RedisError):
            redis.Redis.from_url(plain, socket_timeout=2, socket_connect_timeout=2).ping()
    finally:
        server.stop()

"""Flower against real pools: it needs credentials, lists both pools, and shows each
request with its kwargs, state (PROGRESS while a long image runs) and runtime."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import KEYS, eventually

from omni_tasks.tasks.definitions import generate_image, generate_text

ROOT = Path(__file__).resolve().parents[2]
AUTH = "ops:flower-test-pw"
TIMEOUT = 300
#: Big enough on the tiny model to run past the first progress write (1 s).
LONG_IMAGE = {"width": 384, "height": 384, "steps": 100}  # seconds long: PROGRESS shows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, auth: str | None = AUTH) -> Any:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def flower(pools, run_dir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "celery", "-A", "omni_tasks", "flower", "--address=127.0.0.1"]
    cmd += [f"--port={port}", f"--basic-auth={AUTH}", "--inspect_timeout=5000"]
    log = (run_dir / "flower.log").open("wb")
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=log, stderr=log, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        assert eventually(lambda: _answers(base + "/healthcheck"), 60), "Flower did not start"
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def test_api_needs_credentials_and_lists_both_pools(flower: str, pools: dict) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"{flower}/api/workers", auth=None)
    assert refused.value.code == 401
    hosts = {w.hostname for w in pools.values()}
    known = eventually(
        lambda: hosts <= set(w := get(f"{flower}/api/workers?refresh=1")) and w, 60, 0.5
    )
    assert known, get(f"{flower}/api/workers?refresh=1")
    queues = {q["name"] for host in hosts for q in known[host]["active_queues"]}
    assert {"ar", "diffusion", "diffusion.tiny-flux"} <= queues  # and the worker's model's
    # Flower's own /metrics answers without credentials (hence loopback, see below).
    with urllib.request.urlopen(f"{flower}/metrics", timeout=10) as response:
        assert response.status == 200 and b"flower_events_total" in response.read()


def test_broker_tab_lists_every_queue_the_workers_read(flower: str, pools: dict) -> None:
    """The pools' queues, each diffusion worker's model's queue and its own queue
    (cache-affinity routing), counted over every priority list of kombu's default
    separator."""

    own = KEYS.worker_queue(pools["diffusion"].hostname)
    lengths = eventually(
        lambda: {q["name"]: q["messages"] for q in _queue_lengths(flower)}, 60, 0.5
    )
    assert {"ar", "diffusion", "diffusion.tiny-flux", own} <= set(lengths), lengths
    assert all(isinstance(n, int) for n in lengths.values())


def _queue_lengths(flower: str) -> list[dict[str, Any]]:
    found = get(f"{flower}/api/queues/length").get("active_queues", [])
    return found if len(found) >= 3 else []


def test_tasks_show_kwargs_state_runtime_and_progress(flower: str) -> None:
    text = generate_text.delay(prompt="flower sees me", max_tokens=4)
    image = generate_image.delay(prompt="a slow fox", seed=3, **LONG_IMAGE)
    seen = eventually(lambda: _state(flower, image.id) == "PROGRESS", 120, 0.2)
    assert seen, get(f"{flower}/api/task/info/{image.id}")
    text.get(TIMEOUT)
    image.get(TIMEOUT)
    tasks = eventually(lambda: _done(flower, [text.id, image.id]), 30, 0.5)
    assert tasks, get(f"{flower}/api/tasks")
    for task_id, kind in ((text.id, "generate_text"), (image.id, "generate_image")):
        task = tasks[task_id]
        assert task["state"] == "SUCCESS" and task["runtime"] > 0
        assert task["name"] == f"omni_tasks.{kind}"
    assert json.loads(tasks[text.id]["kwargs"])["prompt"] == "flower sees me"
    assert json.loads(tasks[image.id]["kwargs"])["steps"] == LONG_IMAGE["steps"]


def _state(flower: str, task_id: str) -> str | None:
    return get(f"{flower}/api/tasks").get(task_id, {}).get("state")


def _done(flower: str, ids: list[str]) -> dict[str, Any] | None:
    tasks = get(f"{flower}/api/tasks")
    if all(tasks.get(i, {}).get("state") == "SUCCESS" for i in ids):
        return tasks
    return None

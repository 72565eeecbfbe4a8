"""Malformed messages never stop a worker: raw entries LPUSHed straight into a pool's
Redis lists (kombu's envelope, or garbage) are each rejected and recorded in the
rejected list with their first bytes, total size and reason; where an entry names a
task, that task ends FAILURE with the reason; and the same worker process then serves a
normal request.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from conftest import clean_redis, start_ready_workers
from helpers import assert_png, envelope, eventually

from omni_tasks import generate_image
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.rejections import MAX_BODY_CHARS, list_rejections
from workers.transport import MAX_ENTRY_BYTES

pytestmark = pytest.mark.slow
TIMEOUT = 120
QUEUE = "diffusion"
IMAGE = "omni_tasks.generate_image"


@pytest.fixture(scope="module")
def worker(tiny_models, run_dir: Path) -> Iterator:
    clean_redis()
    (process,) = start_ready_workers([QUEUE], run_dir / "logs")
    yield process
    process.stop()
    clean_redis()


def push(entry: bytes | str | dict, level: int = 0) -> None:
    raw = json.dumps(entry) if isinstance(entry, dict) else entry
    get_redis().lpush(keys.queue_key(QUEUE, level), raw)


def record_where(match: Any, since: float) -> dict[str, Any]:
    """The newest rejection record since `since` that `match` accepts (waits for it)."""

    def find() -> dict[str, Any] | None:
        return next(
            (r for r in list_rejections(get_redis()) if r["time"] >= since and match(r)), None
        )

    record = eventually(find, timeout_s=60)
    assert record, list_rejections(get_redis(), 5)
    return record


def assert_serving(worker: Any, pid: int) -> None:
    """The same worker process is alive and runs a normal request to the end."""
    value = generate_image.delay(prompt="still here", width=32, height=32, steps=1).get(TIMEOUT)
    assert_png(value["image_path"], 32, 32)
    assert worker.proc.poll() is None and worker.proc.pid == pid
    assert "Unrecoverable error" not in worker.log_path.read_text(errors="replace")


def assert_failed(task_id: str, *reason: str) -> dict[str, Any]:
    """The task ended FAILURE naming `reason`; returns its rejection record."""
    result = AsyncResult(task_id)
    with pytest.raises(Exception) as caught:
        result.get(TIMEOUT)
    assert all(part in str(caught.value) for part in reason), caught.value
    assert result.state == "FAILURE"
    return next(r for r in list_rejections(get_redis()) if r["task_id"] == task_id)


GARBAGE = [
    pytest.param(b"this is not JSON {", "not JSON", id="not-json"),
    pytest.param(b"42", "JSON int", id="json-42"),
    pytest.param(b'[1, 2, "a list"]', "JSON list", id="json-list"),
]


@pytest.mark.parametrize(("raw", "reason"), GARBAGE)
def test_a_garbage_entry_is_recorded_and_dropped(worker, raw: bytes, reason: str) -> None:
    pid, since = worker.proc.pid, time.time()
    push(raw, level=6)
    record = record_where(lambda r: r["body"] == raw.decode(), since)
    assert reason in record["reason"] and record["task_id"] is None
    assert record["queue"] == QUEUE and record["size"] == len(raw)
    assert_serving(worker, pid)
    assert sum(get_redis().llen(k) for k in keys.queue_keys(QUEUE)) == 0  # not requeued


def test_a_20_mb_garbage_entry_is_recorded_bounded(worker) -> None:
    pid, since = worker.proc.pid, time.time()
    raw = b"\xff" + os.urandom(20 * 1024 * 1024)
    push(raw)
    record = record_where(lambda r: r["size"] == len(raw), since)
    assert "not JSON" in record["reason"]
    assert record["body"].startswith("\\xff") and len(record["body"]) <= MAX_BODY_CHARS
    assert_serving(worker, pid)


def test_a_body_that_is_not_base64_fails_its_task(worker) -> None:
    pid, task_id = worker.proc.pid, uuid.uuid4().hex
    entry = envelope(IMAGE, {"prompt": "fox"}, task_id)
    entry["body"] = "@@ not base64 @@"
    push(entry)
    record = assert_failed(task_id, "body", "not base64")
    assert record["task"] == IMAGE and record["body"] == json.dumps(entry)
    assert_serving(worker, pid)


def test_an_oversized_message_fails_its_task_unparsed(worker) -> None:
    pid, task_id = worker.proc.pid, uuid.uuid4().hex
    entry = envelope(IMAGE, {"prompt": "x" * MAX_ENTRY_BYTES}, task_id)
    raw = json.dumps(entry).encode()
    push(raw)
    record = assert_failed(task_id, "too large", str(len(raw)))
    assert record["size"] == len(raw) and len(record["body"]) == MAX_BODY_CHARS
    assert_serving(worker, pid)


BAD_MESSAGES = [
    pytest.param("omni_tasks.no_such_task", {"prompt": "x"}, ["no_such_task"], id="unknown-task"),
    pytest.param(IMAGE, ["prompt", "fox"], ["kwargs", "list"], id="kwargs-a-list"),
    pytest.param(None, {"prompt": "fox"}, ["missing headers"], id="no-headers"),
    pytest.param(IMAGE, {"width": 64}, ["prompt"], id="missing-kwarg"),
    pytest.param(IMAGE, {"prompt": "fox", "width": "abc"}, ["width"], id="ill-typed-kwarg"),
]


@pytest.mark.parametrize(("task", "kwargs", "reason"), BAD_MESSAGES)
def test_a_bad_task_message_fails_its_task(worker, task, kwargs, reason: list[str]) -> None:
    pid, task_id = worker.proc.pid, uuid.uuid4().hex
    push(envelope(task, kwargs, task_id), level=3)
    record = assert_failed(task_id, *reason)
    assert record["queue"] == QUEUE and record["size"] > 0
    assert_serving(worker, pid)


def test_a_pickled_message_is_refused(worker) -> None:
    pid, task_id = worker.proc.pid, uuid.uuid4().hex
    entry = envelope(
        IMAGE, {"prompt": "fox"}, task_id, content_type="application/x-python-serialize"
    )
    entry["body"] = base64.b64encode(b"\x80\x04K*.").decode()  # pickle of 42
    push(entry)
    record = assert_failed(task_id, "content type", "pickle")
    assert record["body"] == "\\x80\x04K*."  # non-UTF-8 bytes escaped
    assert_serving(worker, pid)

"""Test helpers: raw messages that bypass the producer's checks, PNG inspection."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from PIL import Image


def publish_raw(
    task_name: str,
    kwargs: Any,
    queue: str,
    serializer: str = "json",
    task_id: str | None = None,
) -> str:
    """Send a task message straight to a queue, skipping validation and routing."""
    from omni_tasks import app

    task_id = task_id or uuid.uuid4().hex
    message = app.amqp.create_task_message(task_id, task_name, (), kwargs)
    with app.producer_or_acquire() as producer:
        app.amqp.send_task_message(
            producer, task_name, message, queue=app.amqp.queues[queue], serializer=serializer
        )
    return task_id


def eventually(check, timeout_s: float = 10.0, interval_s: float = 0.05):
    """Poll `check()` until it returns a truthy value (counters flush asynchronously)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def assert_png(path: str | Path, width: int, height: int) -> None:
    path = Path(path)
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (width, height)
        assert any(lo < hi for lo, hi in img.getextrema())  # a rendering, not a blank canvas

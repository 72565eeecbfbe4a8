"""Test helpers: raw messages that bypass the producer's checks, PNG inspection, the
foreign Celery client."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from omni_tasks.coordination.keyspace import KeySpace, keyspace

#: The keys of the tests' config (its default `key_prefix`), for tests that read or write
#: omni-tasks' own Redis keys.
KEYS: KeySpace = keyspace("omni")

#: The RabbitMQ the broker tests use when it answers (they skip otherwise).
AMQP_URL = os.environ.get("OMNI_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def amqp_answers(url: str) -> bool:
    """Whether an AMQP broker answers at `url` within about two seconds."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


#: The JSON keys of each result, in order: the shape callers of every version rely on.
USAGE_KEYS = ["prompt_tokens", "completion_tokens", "total_tokens"]
TEXT_KEYS = [
    "request_id",
    "request_type",
    "text",
    "usage",
    "finish_reason",
    "engine",
    "model",
    "timings",
    "lora",
    "choices",
]
PROMPT_KEYS = ["request_id", "text", "image_prompt", "usage", "finish_reason", "engine", "timings"]
IMAGE_KEYS = [
    "request_id",
    "request_type",
    "image_path",
    "width",
    "height",
    "seed",
    "steps",
    "steps_run",
    "step_cache",
    "cache",
    "engine",
    "model",
    "timings",
    "denoise_steps",
    "preemptions",
    "max_batch",
    "lora",
]
MULTIMODAL_KEYS = [*IMAGE_KEYS, "text", "image_prompt", "usage", "finish_reason", "stages"]
#: A Celery client that never imports omni_tasks (`foreign_client.py`).
FOREIGN_CLIENT = Path(__file__).with_name("foreign_client.py")
#: The queue `.delay()` sends image requests to: the default diffusion model's.
DIT_QUEUE = "diffusion.tiny-flux"
#: Image sizes whose DiT cost falls in the lowest and a high cost bucket.
SMALL = {"width": 64, "height": 64, "steps": 4}
LARGE = {"width": 512, "height": 512, "steps": 20}


#: The task a raw envelope names when it names none in its headers.
IMAGE_TASK = "omni_tasks.generate_image"


def envelope(
    task: str | None,
    kwargs: Any,
    task_id: str,
    content_type: str = "application/json",
    queue: str = "diffusion",
) -> dict[str, Any]:
    """A kombu Redis envelope as a producer writes it (JSON, base64 body), unchecked."""
    from omni_tasks import app

    message = app.amqp.create_task_message(task_id, task or IMAGE_TASK, (), {})
    headers = {**message.headers, "task": task} if task else {}
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None}])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": queue, "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def mixed_text_requests(n: int, prefix: str = "r") -> list[Any]:
    """Text requests of every priority class, every other one with a deadline."""
    from omni_tasks import create_text_request

    classes = ("high", "normal", "low")
    return [
        create_text_request(
            f"{prefix} {i}",
            request_id=f"{prefix}-{i}",
            priority=classes[i % 3],
            max_tokens=2,
            **({"timeout_s": 30 + i} if i % 2 else {}),
        )
        for i in range(n)
    ]


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


async def eventually_async(check, timeout_s: float = 10.0, interval_s: float = 0.05):
    """`eventually` inside an event loop: the loop keeps running between checks."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(interval_s)


def assert_png(path: str | Path, width: int, height: int) -> None:
    path = Path(path)
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (width, height)
        assert any(lo < hi for lo, hi in img.getextrema())  # a rendering, not a blank canvas


def queued_messages(client: Any, queue: str) -> list[tuple[int, dict[str, Any]]]:
    """(priority level, message) of every message waiting in `queue`, oldest first per level.

    kombu LPUSHes, and consumers pop from the right: the oldest message is last in LRANGE.
    """
    import json

    from omni_tasks.coordination.keys import queue_key

    found: list[tuple[int, dict[str, Any]]] = []
    for level in range(10):
        raw = client.lrange(queue_key(queue, level), 0, -1)
        found += [(level, json.loads(m)) for m in reversed(raw)]
    return found


def where(
    client: Any, task_id: str, queues: tuple[str, ...] = ("ar", "diffusion", DIT_QUEUE)
) -> tuple[str, int]:
    """The (queue, priority) list in Redis that holds the message of `task_id`."""
    for queue in queues:
        for level, message in queued_messages(client, queue):
            if message["headers"]["id"] == task_id:
                return queue, level
    raise AssertionError(f"{task_id} is in no queue")


def message_kwargs(message: dict[str, Any]) -> dict[str, Any]:
    """The task kwargs of a kombu message as it sits in Redis (JSON, base64 body)."""
    import base64
    import json

    _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return kwargs


def foreign(*args: str, timeout_s: float = 300) -> Any:
    """Run the foreign client (its own process, never importing omni_tasks) against
    the tests' Redis; its last line of output, as JSON."""
    out = subprocess.run(
        [sys.executable, str(FOREIGN_CLIENT), os.environ["OMNI_REDIS_URL"], *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=FOREIGN_CLIENT.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_heartbeat(client: Any, hostname: str, mapping: dict[str, Any], ttl_s: int = 30) -> None:
    """A live worker's heartbeat as the worker side writes it: its hash (expiring) and
    its entry in the worker index of its kind (`coordination.worker_index`)."""
    import time

    from omni_tasks.coordination import worker_index

    stages = json.loads(mapping.get("stages") or "[]")
    queues = json.loads(mapping.get("queues") or "[]")
    kinds = worker_index.kinds_of([*stages, *(["dit"] if "diffusion" in queues else [])])
    client.hset(KEYS.worker(hostname), mapping=mapping)
    client.expire(KEYS.worker(hostname), ttl_s)
    for kind in kinds:
        client.zadd(KEYS.worker_beats(kind), {hostname: time.time()})


def state_and_info(result: Any) -> tuple[str, Any]:
    """A task's state and info from one read of its result (two reads, `.state` then
    `.info`, can straddle a change: a STARTED info beside a PROGRESS state)."""
    meta = result.backend.get_task_meta(result.id, cache=False)
    return meta.get("status"), meta.get("result")

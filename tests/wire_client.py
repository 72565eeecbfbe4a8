"""A Celery client that never imports omni_tasks: a plain `Celery(broker=, backend=)`
with kombu's default transport options, sending by task name with `queue=`, as a
service in another codebase would (`docs/wire.md`). Run as a script by
tests/integration/test_wire_foreign.py:

    python tests/wire_client.py REDIS_URL TIMEOUT_S

It prints one JSON object: for each case, the task id and the result, or the error's
type name and args as this client rebuilt them.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from celery import Celery

IMAGE = {"width": 32, "height": 32, "steps": 2}


def outcome(result: Any, timeout_s: float) -> dict[str, Any]:
    try:
        return {"id": result.id, "result": result.get(timeout=timeout_s)}
    except Exception as exc:  # noqa: BLE001 - what the caller sees is the point
        return {"id": result.id, "error": type(exc).__name__, "args": list(exc.args)}


def send_all(app: Celery, created_at: float) -> dict[str, Any]:
    """Every case at once, so the pools run them side by side."""
    send = app.send_task
    text = {"prompt": "hello from elsewhere", "max_tokens": 8, "priority": "low"}
    return {
        # No broker priority: ordered by its priority class (re-routed on arrival).
        "text": send(
            "omni_tasks.generate_text", kwargs={**text, "created_at": created_at}, queue="ar"
        ),
        # An integer priority with kombu's default steps: served where it lands.
        "image": send(
            "omni_tasks.generate_image",
            kwargs={"prompt": "a fox", "seed": 3, **IMAGE},
            queue="diffusion",
            priority=5,
        ),
        "multimodal": send(
            "omni_tasks.generate_multimodal",
            kwargs={"prompt": "a lighthouse", "max_tokens": 8, **IMAGE},
            queue="ar",
            priority=5,
        ),
        "multimodal_no_priority": send(
            "omni_tasks.generate_multimodal",
            kwargs={"prompt": "a harbour", "max_tokens": 8, **IMAGE},
            queue="ar",
        ),
        "bad_field": send(
            "omni_tasks.generate_image",
            kwargs={"prompt": "a fox", **IMAGE, "width": 33},
            queue="diffusion",
            priority=5,
        ),
        "positional": send("omni_tasks.generate_text", args=["hi"], queue="ar", priority=5),
        "positional_no_priority": send("omni_tasks.generate_text", args=["hi"], queue="ar"),
        "other_request_id": send(
            "omni_tasks.generate_text",
            kwargs={"prompt": "x", "request_id": "someone-else"},
            queue="ar",
            priority=5,
        ),
    }


def reuse(app: Celery, first: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The first text request's id sent again: the same request, then another one."""
    kwargs = {"prompt": "hello from elsewhere", "max_tokens": 8, "priority": "low"}
    out = {}
    for case, changes in (("repeat", {}), ("conflict", {"prompt": "something else"})):
        sent = app.send_task(
            "omni_tasks.generate_text",
            kwargs={**kwargs, **changes},
            task_id=first["id"],
            queue="ar",
            priority=5,
        )
        out[case] = outcome(sent, timeout_s)
    return out


def main(url: str, timeout_s: float) -> dict[str, Any]:
    app = Celery("foreign-client", broker=url, backend=url)
    created_at = time.time()
    sent = send_all(app, created_at)
    out = {name: outcome(result, timeout_s) for name, result in sent.items()}
    out["text"]["created_at"] = created_at
    out.update(reuse(app, out["text"], timeout_s))
    out["transport_options"] = dict(app.conf.broker_transport_options)
    return out


if __name__ == "__main__":
    report = main(sys.argv[1], float(sys.argv[2]))
    assert "omni_tasks" not in sys.modules, "the foreign client imported omni_tasks"
    print(json.dumps(report))

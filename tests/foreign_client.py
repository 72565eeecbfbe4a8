"""A Celery client that never imports omni_tasks, with default transport options: how
a service in another codebase enqueues work. Run as a script by the wire tests.

    python foreign_client.py REDIS_URL send SPEC_JSON   -> prints the task ids
    python foreign_client.py REDIS_URL wait IDS_JSON    -> prints results or errors
                                                           (`wire_client.outcome`)
    python foreign_client.py REDIS_URL ping             -> prints the workers that answer

SPEC_JSON is a list of {"task", "kwargs", "queue", "priority" and "task_id" (both
optional)}.
"""

from __future__ import annotations

import json
import sys

from celery import Celery
from wire_client import outcome


def client(url: str) -> Celery:
    app = Celery("foreign", broker=url, backend=url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    return app


def send(app: Celery, spec: list[dict]) -> list[str]:
    ids = []
    for message in spec:
        options = {"queue": message["queue"]}
        for option in ("priority", "task_id"):
            if option in message:
                options[option] = message[option]
        ids.append(app.send_task(message["task"], kwargs=message["kwargs"], **options).id)
    return ids


def wait(app: Celery, ids: list[str], timeout_s: float = 240) -> list[dict]:
    return [outcome(app.AsyncResult(task_id), timeout_s) for task_id in ids]


def main() -> None:
    url, command = sys.argv[1], sys.argv[2]
    app = client(url)
    if command == "send":
        print(json.dumps(send(app, json.loads(sys.argv[3]))))
    elif command == "wait":
        print(json.dumps(wait(app, json.loads(sys.argv[3]))))
    elif command == "ping":
        replies = app.control.ping(timeout=3) or []
        print(json.dumps(sorted(name for reply in replies for name in reply)))
    assert "omni_tasks" not in sys.modules, "the foreign client imported omni_tasks"


if __name__ == "__main__":
    main()

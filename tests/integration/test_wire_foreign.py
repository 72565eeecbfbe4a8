"""The wire contract on real pools (docs/wire.md).

A Celery client that never imports omni_tasks (tests/wire_client.py, run as its own
process with kombu's default transport options) sends text, image and multimodal
requests by name with `queue=`, bad ones, and re-uses an id. Then the same rules are
checked through omni-tasks' own producers: the idempotent repeat, the conflicting
re-use, the design doc's basic example run twice, multimodal by name, and typed errors.
Last, one id, one run: the same request sent twice at once (a foreign client at every
kind of priority, `send_task` with and without one) runs once, and a conflicting
message sent while a request runs leaves that request's states alone.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import KEYS, assert_png, eventually, publish_raw
from helpers import foreign as foreign_client
from jsonschema import Draft202012Validator

import omni_tasks
from omni_tasks import (
    OmniScheduler,
    RequestConflictError,
    RequestValidationError,
    create_text_request,
    generate_image,
    generate_text,
)
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.rejections import list_rejections
from omni_tasks.wire_schema import DEFAULT_DIR

pytestmark = pytest.mark.slow

TIMEOUT = 300
CLIENT = Path(__file__).resolve().parents[1] / "wire_client.py"


def valid(name: str, value: Any) -> None:
    validator = Draft202012Validator(json.loads((DEFAULT_DIR / name).read_text()))
    problems = [e.message for e in validator.iter_errors(value)]
    assert problems == [], problems


def rejection(task_id: str) -> dict[str, Any] | None:
    return next((r for r in list_rejections(get_redis(), 1000) if r["task_id"] == task_id), None)


def stats(queue: str) -> dict[str, str]:
    return get_redis().hgetall(KEYS.stats(queue))


def stored_failure(task_id: str) -> dict[str, Any]:
    """A failed task's meta as it sits in Redis (what a client in any language reads)."""
    backend = omni_tasks.app.backend
    meta = json.loads(get_redis().get(backend.get_key_for_task(task_id).decode()))
    assert meta["status"] == "FAILURE"
    return meta["result"]


@pytest.fixture(scope="module")
def foreign(pools: dict) -> dict[str, Any]:
    """What the foreign client saw, case by case (one run, shared by the tests)."""
    done = subprocess.run(
        [sys.executable, str(CLIENT), os.environ["OMNI_REDIS_URL"], str(TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
        cwd=CLIENT.parent.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


# ------------------------------------------------------------- the foreign client


def test_the_client_keeps_kombus_default_transport_options(foreign: dict) -> None:
    assert foreign["transport_options"] == {}  # no priority_steps, no sep


def test_text_by_name_is_served_under_the_callers_id(foreign: dict) -> None:
    case = foreign["text"]
    result = case["result"]
    valid("generate_text.result.json", result)
    assert result["request_id"] == case["id"] and result["usage"]["completion_tokens"] > 0
    timings = result["timings"]  # queued from the created_at the client sent
    assert timings["queued_s"] == pytest.approx(
        timings["started_at"] - case["created_at"], abs=2e-3
    )


def test_an_image_with_an_integer_priority_is_served(foreign: dict) -> None:
    case = foreign["image"]
    result = case["result"]
    valid("generate_image.result.json", result)
    assert result["request_id"] == case["id"]
    assert Path(result["image_path"]).name == f"{case['id']}.png"
    assert (result["width"], result["height"], result["seed"]) == (32, 32, 3)
    assert_png(result["image_path"], 32, 32)


@pytest.mark.parametrize("case", ["multimodal", "multimodal_no_priority"])
def test_multimodal_by_name_resolves_under_the_callers_id(foreign: dict, case: str) -> None:
    sent = foreign[case]
    result = sent["result"]
    valid("generate_multimodal.result.json", result)
    assert result["request_id"] == sent["id"] and result["request_type"] == "multimodal"
    assert result["image_prompt"] and set(result["stages"]) == {"ar", "dit"}
    assert Path(result["image_path"]).name == f"{sent['id']}.png"
    assert_png(result["image_path"], 32, 32)


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("bad_field", "width"),
        ("positional", "args"),
        ("positional_no_priority", "args"),
        ("other_request_id", "request_id"),
    ],
)
def test_refusals_reach_the_foreign_caller_typed_and_are_recorded(
    foreign: dict, case: str, field: str
) -> None:
    sent = foreign[case]
    assert (sent["error"], sent["args"][0]) == ("RequestValidationError", field)
    stored = stored_failure(sent["id"])
    valid("failure.json", stored)
    assert (stored["exc_module"], stored["exc_message"][0]) == ("omni_tasks.errors", field)
    record = rejection(sent["id"])
    assert record is not None and field in record["reason"]


def test_a_foreign_repeat_is_answered_with_the_result_and_not_run_again(foreign: dict) -> None:
    assert foreign["repeat"]["id"] == foreign["text"]["id"]
    assert foreign["repeat"]["result"] == foreign["text"]["result"]
    assert eventually(lambda: stats("ar").get("duplicates") == "1", timeout_s=30)


def test_a_foreign_conflicting_reuse_is_refused_and_the_first_result_stands(
    foreign: dict,
) -> None:
    assert foreign["conflict"]["result"] == foreign["text"]["result"]
    record = eventually(lambda: rejection(foreign["text"]["id"]), timeout_s=30)
    assert record is not None and "different request" in record["reason"]


# --------------------------------------------------------- omni-tasks' producers


def test_the_same_request_again_gets_the_stored_result(pools: dict) -> None:
    fields = {"prompt": "say it once", "max_tokens": 4, "request_id": "once"}
    first, in_flight = generate_text.delay(**fields), generate_text.delay(**fields)
    value = first.get(TIMEOUT)
    assert in_flight.get(TIMEOUT) == value == generate_text.delay(**fields).get(TIMEOUT)
    assert value["request_id"] == "once"

    # One message, run once: the worker received and ran "once" a single time (its
    # log; the pool's counters flush in batches, shared with the other tests' runs).
    def log() -> str:
        return pools["ar"].log_path.read_text(errors="replace")

    assert eventually(lambda: "generate_text[once] succeeded" in log())
    assert log().count("generate_text[once] received") == 1
    assert log().count("generate_text[once] succeeded") == 1


def test_a_different_request_under_a_used_id_is_refused(pools: dict) -> None:
    value = generate_text.delay(prompt="first words", max_tokens=4, request_id="taken").get(TIMEOUT)
    with pytest.raises(RequestConflictError) as info:
        generate_text.delay(prompt="other words", max_tokens=4, request_id="taken")
    assert info.value.field == "request_id"
    assert omni_tasks.app.AsyncResult("taken").get(TIMEOUT) == value


def test_the_design_docs_basic_example_run_twice(pools: dict) -> None:
    """`process_request` never returns another request's result."""

    async def example(prompt: str) -> Any:
        scheduler = OmniScheduler()
        await scheduler.start()
        try:
            request = create_text_request(
                request_id="req_001",
                prompt=prompt,
                sampling_params={"max_tokens": 16, "temperature": 0},
            )
            return await scheduler.process_request(request, timeout=TIMEOUT)
        finally:
            await scheduler.stop()

    first = asyncio.run(example("Hello, world!"))
    assert first["request_id"] == "req_001"
    assert asyncio.run(example("Hello, world!")) == first
    with pytest.raises(RequestConflictError):
        asyncio.run(example("Goodbye, world!"))


def test_multimodal_by_name_on_omnis_app(pools: dict) -> None:
    sent = omni_tasks.app.send_task(
        "omni_tasks.generate_multimodal",
        kwargs={"prompt": "a harbour at night", "max_tokens": 4, "width": 32, "height": 32},
    )
    result = sent.get(TIMEOUT)
    assert result["request_id"] == sent.id and result["image_prompt"]


def test_a_refusal_reaches_an_omni_caller_as_its_own_class(pools: dict) -> None:
    task_id = publish_raw("omni_tasks.generate_image", {"prompt": "x", "width": 33}, "diffusion")
    with pytest.raises(RequestValidationError) as info:
        omni_tasks.app.AsyncResult(task_id).get(TIMEOUT)
    assert (info.value.field, info.value.message) == ("width", "must be a multiple of 16")


# ------------------------------------------------------------- one id, one run


def runs_of(pools: dict, task: str, task_id: str) -> int:
    """How many times the pools ran `task_id` to success (their logs)."""
    logs = "".join(w.log_path.read_text(errors="replace") for w in pools.values())
    return logs.count(f"{task}[{task_id}] succeeded")


def twins(kind: str, priority: int | None) -> list[dict[str, Any]]:
    """The same message twice: a text or an image request, at `priority` (None: sent
    without one, which the worker re-routes by its class)."""
    tag = "none" if priority is None else str(priority)
    if kind == "text":
        kwargs: dict[str, Any] = {"prompt": f"twin {tag}", "max_tokens": 24, "temperature": 0}
        message = {"task": "omni_tasks.generate_text", "queue": "ar", "kwargs": kwargs}
    else:
        kwargs = {"prompt": f"twin {tag}", "width": 64, "height": 64, "steps": 8, "seed": 2}
        message = {"task": "omni_tasks.generate_image", "queue": "diffusion", "kwargs": kwargs}
    message["task_id"] = f"twin-{kind}-{tag}"
    if priority is not None:
        message["priority"] = priority
    return [message, dict(message)]


def test_a_foreign_request_sent_twice_at_once_runs_once(pools: dict) -> None:
    before = {q: int(stats(q).get("duplicates", 0)) for q in ("ar", "diffusion")}
    spec = [m for kind in ("text", "image") for p in (None, 0, 5, 9) for m in twins(kind, p)]
    ids = sorted(set(foreign_client("send", json.dumps(spec))))
    assert len(ids) == 8
    results = foreign_client("wait", json.dumps(ids))
    assert all(r.get("result", {}).get("request_id") == r["id"] for r in results), results
    for task_id in ids:
        task = "generate_text" if task_id.startswith("twin-text") else "generate_image"
        ran = functools.partial(runs_of, pools, task, task_id)
        assert eventually(lambda ran=ran: ran() >= 1, timeout_s=30)
        assert ran() == 1, task_id
    # Each twin was acknowledged without running, and counted: on arrival where it
    # landed (a priority), or when it was re-routed (none, or 0: kombu's default).
    for queue in ("ar", "diffusion"):
        grown = functools.partial(lambda q: int(stats(q).get("duplicates", 0)) - before[q], queue)
        assert eventually(lambda grown=grown: grown() == 4, timeout_s=30), (queue, grown())


@pytest.mark.parametrize("priority", [None, 5], ids=["no-priority", "priority-5"])
def test_send_task_twice_at_once_runs_once(pools: dict, priority: int | None) -> None:
    task_id = f"by-name-{priority}"
    options = {} if priority is None else {"priority": priority}
    fields = {"prompt": "sent by name twice", "max_tokens": 4}
    sent = [
        omni_tasks.app.send_task(
            "omni_tasks.generate_text", kwargs=fields, task_id=task_id, **options
        )
        for _ in range(2)
    ]
    value = sent[0].get(TIMEOUT)
    assert sent[1].get(TIMEOUT) == value and value["request_id"] == task_id
    assert eventually(lambda: runs_of(pools, "generate_text", task_id) >= 1, timeout_s=30)
    assert runs_of(pools, "generate_text", task_id) == 1


def watch_states(task_id: str, stop: threading.Event) -> list[str]:
    """Every state the id's result passes through, as its first sender could see it."""
    key = omni_tasks.app.backend.get_key_for_task(task_id).decode()
    seen: list[str] = []

    def poll() -> None:
        client = get_redis()
        while not stop.is_set():
            raw = client.get(key)
            status = json.loads(raw)["status"] if raw else "PENDING"
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.005)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def test_a_conflicting_message_leaves_the_running_requests_states(pools: dict) -> None:
    stop = threading.Event()
    seen = watch_states("held-id", stop)
    first = generate_image.delay(
        prompt="the first request", width=128, height=128, steps=100, seed=5, request_id="held-id"
    )
    assert eventually(lambda: first.state in ("STARTED", "PROGRESS"), timeout_s=120)
    other = {"prompt": "another request", "width": 64, "height": 64, "steps": 4}
    message = {"task": "omni_tasks.generate_image", "queue": "diffusion", "kwargs": other}
    foreign_client("send", json.dumps([{**message, "priority": 5, "task_id": "held-id"}]))
    record = eventually(lambda: rejection("held-id"), timeout_s=60)
    running_when_refused = first.state in ("STARTED", "PROGRESS")
    value = first.get(TIMEOUT)
    eventually(lambda: seen[-1] == "SUCCESS", timeout_s=10)
    stop.set()
    assert running_when_refused, "the conflicting message came after the request ended"
    assert record is not None and "different request" in record["reason"]
    assert (value["width"], value["seed"]) == (128, 5)
    # Its sender saw only its own request: started once, progress, then its success.
    assert "FAILURE" not in seen and seen[-1] == "SUCCESS", seen
    assert seen.count("STARTED") == 1, seen
    # The second sender, waiting on the same id, gets the one result (docs/wire.md).
    (theirs,) = foreign_client("wait", json.dumps(["held-id"]))
    assert theirs["result"] == value


def test_a_foreign_chat_request_by_name_is_rendered_and_served(pools: dict) -> None:
    """`omni_tasks.generate_chat` from a client that never imports omni_tasks: the
    messages are rendered with the model's chat template, and the result fits the
    checked-in schema; a chat message without `messages` is refused naming it."""
    messages = [{"role": "user", "content": "a foreign chat"}]
    spec = [
        {"task": "omni_tasks.generate_chat", "queue": "ar", "task_id": "foreign-chat",
         "kwargs": {"messages": messages, "max_tokens": 6, "temperature": 0}},
        {"task": "omni_tasks.generate_chat", "queue": "ar", "task_id": "foreign-chat-bad",
         "kwargs": {"prompt": "no messages"}},
    ]  # fmt: skip
    foreign_client("send", json.dumps(spec))
    good, bad = foreign_client("wait", json.dumps(["foreign-chat", "foreign-chat-bad"]))
    valid("generate_chat.result.json", good["result"])
    assert good["result"]["request_type"] == "chat"
    assert good["result"]["usage"]["completion_tokens"] == 6
    assert "messages" in json.dumps(bad), bad

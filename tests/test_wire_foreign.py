"""The wire contract on real pools (docs/wire.md).

A Celery client that never imports omni_tasks (tests/wire_client.py, run as its own
process with kombu's default transport options) sends text, image and multimodal
requests by name with `queue=`, bad ones, and re-uses an id. Then the same rules are
checked through omni-tasks' own producers: the idempotent repeat, the conflicting
re-use, the design doc's basic example run twice, multimodal by name, and typed errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_png, eventually, publish_raw
from jsonschema import Draft202012Validator

import omni_tasks
from omni_tasks import (
    OmniScheduler,
    RequestConflictError,
    RequestValidationError,
    create_text_request,
    generate_text,
)
from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.rejections import list_rejections
from omni_tasks.wire_schema import DEFAULT_DIR

pytestmark = pytest.mark.slow

TIMEOUT = 300
CLIENT = Path(__file__).with_name("wire_client.py")


def valid(name: str, value: Any) -> None:
    validator = Draft202012Validator(json.loads((DEFAULT_DIR / name).read_text()))
    problems = [e.message for e in validator.iter_errors(value)]
    assert problems == [], problems


def rejection(task_id: str) -> dict[str, Any] | None:
    return next((r for r in list_rejections(1000) if r["task_id"] == task_id), None)


def stats(queue: str) -> dict[str, str]:
    return get_redis().hgetall(keys.stats(queue))


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

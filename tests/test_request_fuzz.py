"""Fuzzed request fields through `.delay()`: each call either enqueues a message a worker
accepts too, or raises RequestValidationError naming a field that was given a bad value
and leaves Redis exactly as it was. Producer side only: no worker runs."""

from __future__ import annotations

import base64
import io
import string
import uuid
from typing import Any

import pytest
from helpers import DIT_QUEUE, message_kwargs, queued_messages
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from omni_tasks import (
    OmniRequest,
    RequestValidationError,
    generate_image,
    generate_multimodal,
    generate_text,
)
from omni_tasks.coordination.keys import queue_key
from omni_tasks.requests import MAX_SEED, STEP_CACHE_MODES

QUEUES = ("ar", "diffusion", DIT_QUEUE)
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 16), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = _image("PNG"), _image("JPEG")
BOMB_PNG = PNG[:16] + (50_000).to_bytes(4, "big") + (50_000).to_bytes(4, "big") + PNG[24:]

# Values that are wrong for almost any field: a field given one of these is "junk".
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
NUMBER_AS_TEXT = st.integers(min_value=0, max_value=5000).map(str)
NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
SIDES = st.sampled_from(range(16, 2049, 16))


def floats(lo: float, hi: float, exclude_min: bool = False) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, exclude_min=exclude_min, allow_nan=False, allow_infinity=False)


COMMON: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    # field: (valid values, junk values)
    "priority": (st.sampled_from(["high", "normal", "low"]), st.one_of(JUNK, st.just("urgent"))),
    "timeout_s": (floats(0, 86400, exclude_min=True), st.one_of(JUNK, NON_FINITE)),
    "request_id": (
        st.text(string.ascii_letters + string.digits + "-_./:", min_size=1, max_size=40).map(
            lambda s: f"{s}-{uuid.uuid4().hex[:8]}"  # unique: a repeat id is its own case
        ),
        st.one_of(
            st.sampled_from(["", "   ", "a\nb", "tab\there", "x" * 129]),
            st.integers(),
            JUNK.filter(lambda v: not isinstance(v, str)),
            # junk text may be a valid id by chance: unique too, as a repeat is its own case
            st.text(max_size=12).map(lambda s: f"{s}\n{uuid.uuid4().hex[:8]}"),
            st.text(max_size=12).map(lambda s: f"{s}{uuid.uuid4().hex[:8]}"),
        ),
    ),
}
TEXT_FIELDS = {
    "max_tokens": (st.integers(1, 4096), st.one_of(JUNK, NUMBER_AS_TEXT, st.just(True))),
    "temperature": (st.one_of(floats(0, 2), st.integers(0, 2)), st.one_of(JUNK, NON_FINITE)),
    "top_p": (floats(0, 1, exclude_min=True), st.one_of(JUNK, NON_FINITE)),
    "stop": (st.lists(st.text(max_size=5), max_size=8), st.one_of(JUNK, st.lists(st.integers()))),
}
IMAGE_FIELDS = {
    "width": (SIDES, st.one_of(JUNK, NUMBER_AS_TEXT, st.just("64"), st.just(True))),
    "height": (SIDES, st.one_of(JUNK, NUMBER_AS_TEXT, st.just(False))),
    "steps": (st.integers(1, 100), st.one_of(JUNK, NUMBER_AS_TEXT)),
    "guidance": (floats(0, 30), st.one_of(JUNK, NON_FINITE)),
    "seed": (st.integers(0, MAX_SEED), st.one_of(JUNK, st.just(2**33), NUMBER_AS_TEXT)),
    "negative_prompt": (st.text(max_size=20), st.one_of(st.integers(), st.just("x" * 4001))),
    "step_cache": (st.sampled_from(STEP_CACHE_MODES), st.text(max_size=8)),
    "step_cache_params": (
        st.dictionaries(st.text(min_size=1, max_size=6), floats(-1e6, 1e6), max_size=8),
        st.one_of(
            JUNK,
            st.dictionaries(st.text(min_size=1, max_size=6), NON_FINITE, min_size=1, max_size=3),
            st.dictionaries(st.text(min_size=1), st.text(), min_size=1, max_size=3),
            st.dictionaries(st.text(min_size=1), st.booleans(), min_size=1, max_size=3),
        ),
    ),
}
INPUT_IMAGE = (
    st.sampled_from(
        [
            base64.b64encode(PNG).decode(),
            base64.b64encode(JPEG).decode(),
            "data:image/png;base64," + base64.b64encode(PNG).decode(),
        ]
    ),
    st.one_of(
        JUNK,
        st.sampled_from(["/etc/passwd", "/etc/hostname", "in.png", "../x.jpg", "~/.ssh/id_rsa"]),
        st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
        st.just(base64.b64encode(BOMB_PNG).decode()),
    ),
)
EXTRA = st.sampled_from(["colour", "stage", "processing_stage", "errors", "Prompt"])


@st.composite
def request_fields(draw: st.DrawFn, fields: dict) -> tuple[dict[str, Any], set[str]]:
    """Some fields, each valid or junk: (kwargs, the names given junk)."""
    kwargs: dict[str, Any] = {}
    junk: set[str] = set()
    valid_prompt = st.text(min_size=1, max_size=40).filter(str.strip)
    bad_prompt = st.one_of(st.sampled_from(["", "  \n", "x" * 4001]), st.integers(), st.binary())
    if draw(st.integers(0, 7)):
        kwargs["prompt"] = draw(valid_prompt)
    else:
        junk.add("prompt")
        if draw(st.booleans()):
            kwargs["prompt"] = draw(bad_prompt)
    for name in draw(st.sets(st.sampled_from(sorted(fields)), max_size=4)):
        good, bad = fields[name]
        if draw(st.integers(0, 3)):  # mostly valid, so that requests also succeed
            kwargs[name] = draw(good)
        else:
            kwargs[name] = draw(bad)
            junk.add(name)
    if not draw(st.integers(0, 9)):
        name = draw(EXTRA)
        kwargs[name] = draw(JUNK)
        junk.add(name)
    return kwargs, junk


def redis_state(client: Any) -> dict[str, Any]:
    """Every key, and the length of every list (the queues): what an enqueue changes."""
    state: dict[str, Any] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        state[key] = (kind, client.llen(key) if kind in (b"list", "list") else None)
    return state


def drain(client: Any) -> None:
    for queue in QUEUES:
        client.delete(*(queue_key(queue, level) for level in range(10)))


def check_delay(client: Any, task: Any, kwargs: dict[str, Any], junk: set[str], first_id) -> None:
    """The property: success (a message a worker validates too) or a refusal naming a
    field that was given junk, with nothing written to Redis."""
    before = redis_state(client)
    try:
        result = task.delay(**kwargs)
    except RequestValidationError as exc:
        top = exc.field.split(".")[0]
        event(f"refused: {top}")
        assert top in junk, (exc.field, str(exc), kwargs)
        assert exc.field in str(exc)
        assert redis_state(client) == before, "a refused request left something in Redis"
        return
    # Junk may be valid by chance (None for `seed`, 5 for `max_tokens`); a bad or
    # missing prompt never is.
    assert "prompt" not in junk, ("accepted a bad prompt", kwargs)
    event("accepted")
    wanted = first_id(result.id)
    found = [
        m for q in QUEUES for _, m in queued_messages(client, q) if m["headers"]["id"] == wanted
    ]
    assert len(found) == 1, wanted
    sent = message_kwargs(found[0])
    again = OmniRequest.from_message(sent)  # what the worker does with it
    assert again.request_id == result.id
    assert_uncoerced(again, kwargs)
    drain(client)


def kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def assert_uncoerced(request: OmniRequest, kwargs: dict[str, Any]) -> None:
    """Strict types: every accepted field arrives as given, never converted (`"16"` to
    16, `True` to 1). The input image is re-encoded canonically; None means the default
    (a random seed, for instance)."""
    for name, sent in kwargs.items():
        if name == "image" or sent is None:
            continue
        value = getattr(request, name)
        assert value == sent and kind(value) == kind(sent), (name, sent, value)


def same(task_id: str) -> str:
    return task_id


@FUZZ
@given(case=request_fields({**COMMON, **TEXT_FIELDS}))
def test_fuzzed_text_requests(redis_client, case) -> None:
    kwargs, junk = case
    check_delay(redis_client, generate_text, kwargs, junk, same)


@FUZZ
@given(case=request_fields({**COMMON, **IMAGE_FIELDS, "image": INPUT_IMAGE}))
def test_fuzzed_image_requests(redis_client, case) -> None:
    kwargs, junk = case
    check_delay(redis_client, generate_image, kwargs, junk, same)


@FUZZ
@given(case=request_fields({**COMMON, **TEXT_FIELDS, **IMAGE_FIELDS}))
def test_fuzzed_multimodal_requests(redis_client, case) -> None:
    kwargs, junk = case
    check_delay(redis_client, generate_multimodal, kwargs, junk, lambda rid: f"{rid}.prompt")


@pytest.mark.parametrize("task", [generate_text, generate_image, generate_multimodal])
def test_all_valid_fields_are_accepted(redis_client, task) -> None:
    """The oracle's other half, pinned: a request with no junk is always enqueued."""
    result = task.delay(prompt="a fox", priority="low", timeout_s=30, request_id="ok-1")
    assert result.id == "ok-1"
    assert sum(len(queued_messages(redis_client, q)) for q in QUEUES) == 1

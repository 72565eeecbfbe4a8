"""A send validates its message once: the router takes the request `.delay()` (or
`send_task` by name) validated, and validates only a message it has not seen."""

from __future__ import annotations

from typing import Any

import pytest

from omni_tasks import app, generate_text
from omni_tasks.requests import OmniRequest
from omni_tasks.tasks import base, router, sending


@pytest.fixture()
def validations(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The kwargs of every `OmniTask.build_request` call while the test runs."""
    seen: list[dict[str, Any]] = []
    build = base.OmniTask.build_request

    def counting(self: base.OmniTask, kwargs: Any, task_id: str | None = None) -> OmniRequest:
        seen.append(kwargs)
        return build(self, kwargs, task_id)

    monkeypatch.setattr(base.OmniTask, "build_request", counting)
    return seen


def test_delay_and_send_task_validate_once(redis_client, validations) -> None:
    generate_text.delay(prompt="once", max_tokens=4)
    assert len(validations) == 1
    app.send_task("omni_tasks.generate_text", kwargs={"prompt": "by name", "max_tokens": 4})
    assert len(validations) == 2


def test_the_router_validates_a_message_no_send_holds(validations) -> None:
    route = router.OmniRouter()("omni_tasks.generate_text", (), {"prompt": "x"}, {})
    assert route is not None and route["queue"] == "ar"
    assert len(validations) == 1
    message = {"prompt": "held"}
    request = base.OmniTask.build_request(generate_text, message)
    with sending.sending(message, request):
        assert sending.request_being_sent(message) is request
        assert sending.request_being_sent(dict(message)) is None  # another object
        router.OmniRouter()("omni_tasks.generate_text", (), message, {})
    assert len(validations) == 2  # the one above, not the router's

"""The demo's workload: every request it sends is valid and each kind and priority class
is there; its follow-ups (an edit, an exact repeat, a new seed) reach the diffusion pool.
(The demo itself starts the three pools, video and audio workers among them: `omni-tasks demo`, the
end-to-end tests' ground.)"""

from __future__ import annotations

import base64
from pathlib import Path

from helpers import DIT_QUEUE, message_kwargs, queued_messages, where

from omni_tasks.dev.demo import _follow_ups, _workload

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def test_every_request_of_the_workload_is_valid() -> None:
    jobs = _workload()
    kinds = {kind for kind, _, _ in jobs}
    assert kinds == {"text", "image", "multimodal", "video", "speech", "sound"}
    assert {kwargs["priority"] for _, _, kwargs in jobs} == {"high", "normal", "low"}
    for _kind, task, kwargs in jobs:
        request = task.build_request(kwargs)  # raises RequestValidationError if not
        assert (request.prompt or request.input) == kwargs.get("prompt", kwargs.get("input"))


def test_follow_ups_go_to_the_diffusion_pool(redis_client, tmp_path: Path) -> None:
    picture = tmp_path / "fox.png"
    picture.write_bytes(PNG_1PX)
    kwargs = {
        "prompt": "a fox",
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 7,
        "priority": "low",
    }
    sent = _follow_ups(kwargs, str(picture))
    assert sorted(job["kind"] for job in sent.values()) == ["image edit", "new seed", "repeat"]
    for task_id in sent:
        assert where(redis_client, task_id)[0] == DIT_QUEUE
    types = {
        m["headers"]["id"]: message_kwargs(m)["request_type"]
        for _, m in queued_messages(redis_client, DIT_QUEUE)
    }
    assert {sent[i]["kind"]: t for i, t in types.items()} == {
        "image edit": "image",
        "repeat": "diffusion",
        "new seed": "diffusion",
    }
    edit = next(job for job in sent.values() if job["kind"] == "image edit")
    assert edit["priority"] == "high"

"""The API's parts on their own: job status from task states, the result hub on the
real Redis and result backend, webhook signatures and backoff, file names, `Prefer`,
the chat prompt, and where previews are taken."""

from __future__ import annotations

import asyncio
import io
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import KEYS
from PIL import Image

from omni_tasks import app
from omni_tasks.api.errors import APIError, body_error, from_core_error, from_failure
from omni_tasks.api.files import file_url, output_root, resolve
from omni_tasks.api.hub import ResultHub, meta_key
from omni_tasks.api.idempotency import HEADER
from omni_tasks.api.job_state import JobRecord, job_view, status_of
from omni_tasks.api.jobs import prefer_wait
from omni_tasks.api.openai_images import input_size
from omni_tasks.api.openai_text import Message, chat_messages
from omni_tasks.api.status import by_class, class_levels
from omni_tasks.api.webhooks import BACKOFF_CAP_S, backoff, sign, verify
from omni_tasks.config import CoreModuleConfig, SchedulerConfig, SchedulerType, get_config
from omni_tasks.errors import BrokerUnavailableError
from workers.previews import preview_steps

SUCCESS = {"status": "SUCCESS", "result": {"text": "x"}}
PROGRESS = {"status": "PROGRESS", "result": {"step": 3, "steps": 8}}


def failure(exc_type: str, message: str, state: str = "FAILURE") -> dict:
    return {"status": state, "result": {"exc_type": exc_type, "exc_message": [message]}}


def test_job_status_from_the_states_of_its_tasks() -> None:
    assert status_of([None]) == ("queued", None)
    assert status_of([{"status": "STARTED"}])[0] == "running"
    assert status_of([PROGRESS])[0] == "running"
    assert status_of([SUCCESS]) == ("succeeded", SUCCESS)
    assert status_of([failure("ProcessingError", "boom")])[0] == "failed"
    assert status_of([failure("RequestTimeoutError", "late")])[0] == "expired"
    assert status_of([failure("TaskRevokedError", "expired", "REVOKED")])[0] == "expired"
    assert status_of([failure("TaskRevokedError", "cancelled", "REVOKED")])[0] == "cancelled"
    # Two stages (MULTIMODAL): between them it runs; a failed first stage ends it.
    assert status_of([SUCCESS, None])[0] == "running"
    assert status_of([PROGRESS, None])[0] == "running"
    assert status_of([failure("ProcessingError", "ar"), None])[0] == "failed"
    assert status_of([SUCCESS, SUCCESS])[0] == "succeeded"


def test_the_job_view_shows_progress_result_and_error() -> None:
    record = JobRecord("job-1", "multimodal", 100.0, base_url="http://api")
    root = output_root(get_config())
    running = job_view(record, [SUCCESS, PROGRESS], root)
    assert running["status"] == "running"
    assert running["progress"] == {"step": 3, "steps": 8, "stage": "dit"}
    failed = job_view(JobRecord("job-2", "text", 1.0), [failure("ResourceError", "too big")], root)
    assert failed["error"]["code"] == "resource_exceeded"
    assert "too big" in failed["error"]["message"] and failed["result"] is None
    done = job_view(JobRecord("job-3", "text", 1.0, webhook_url="http://hook"), [SUCCESS], root)
    assert done["result"] == {"text": "x"} and done["progress"] is None
    assert done["webhook"] == {"url": "http://hook", "status": "pending", "attempts": 0}


def test_failures_map_to_http_statuses_without_a_traceback() -> None:
    assert from_failure(failure("RequestTimeoutError", "late")["result"], "r").status == 504
    revoked = failure("TaskRevokedError", "expired", "REVOKED")["result"]
    assert from_failure(revoked, "r").status == 504
    invalid = from_failure(failure("RequestValidationError", "width: bad")["result"], "r")
    assert invalid.status == 400
    other = from_failure(failure("ValueError", "boom")["result"], "r")
    assert other.status == 500 and "Traceback" not in other.message
    assert body_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "x"}]).status == 400
    extra = body_error([{"type": "extra_forbidden", "loc": ("body", "colour"), "msg": "x"}])
    assert (extra.status, extra.param) == (400, "colour")


def test_the_hub_hears_states_as_the_backend_writes_them() -> None:
    task_id = uuid.uuid4().hex
    written: list[str] = []

    def worker_side() -> None:  # a worker's pace: the hub hears each state it writes
        time.sleep(0.2)
        app.backend.store_result(task_id, {"step": 1, "steps": 2}, "PROGRESS")
        written.append("PROGRESS")
        time.sleep(0.2)
        app.backend.store_result(task_id, {"text": "done"}, "SUCCESS")

    async def scenario() -> tuple:
        hub = ResultHub(get_config().redis_url, KEYS)
        await hub.start()
        try:
            heard = []
            async with hub.listen([meta_key(task_id)]) as queue:
                writer = threading.Thread(target=worker_side)
                writer.start()
                final = await hub.wait(task_id, 10)
                while not queue.empty():
                    heard.append(queue.get_nowait())
            writer.join()
            missing = await hub.wait(uuid.uuid4().hex, 0.3)
            return final, heard, missing, await hub.meta(task_id)
        finally:
            await hub.stop()

    final, heard, missing, meta = asyncio.run(scenario())
    assert final["status"] == "SUCCESS" and final["result"] == {"text": "done"}
    assert [channel for channel, _ in heard] == [meta_key(task_id)] * 2  # PROGRESS, SUCCESS
    assert missing is None  # nothing written: not final after the timeout
    assert meta == final


def test_webhook_signatures_and_backoff() -> None:
    body = b'{"id": "whd_1"}'
    signature = sign("secret", body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify("secret", body, signature)
    assert not verify("secret", body + b" ", signature)
    assert not verify("other", body, signature)
    delays = [backoff(n) for n in range(1, 12)]
    assert 0.9 <= delays[0] <= 1.1 and 1.8 <= delays[1] <= 2.2
    assert max(delays) <= BACKOFF_CAP_S * 1.1


def test_file_names_resolve_only_inside_output_dir(tmp_path) -> None:
    config = get_config()
    root = config.output_path()
    (root / "day").mkdir(parents=True, exist_ok=True)
    image = root / "day" / "a%2Fb.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "day" / "link.png").unlink(missing_ok=True)
    (root / "day" / "link.png").symlink_to(tmp_path / "secret.png")
    assert resolve("day/a%2Fb.png", config) == (image.resolve(), "png")
    assert resolve("day/a%2Fb.webp", config)[1] == "webp"
    for name in ("day/link.png", "../secret.png", "day/.x.png", "/etc/x.png", "day/a%2Fb"):
        with pytest.raises(APIError) as caught:
            resolve(name, config)
        assert caught.value.status == 404, name
    url = file_url("http://api:8000/", "day/a%2Fb.png", "jpeg")
    assert url == "http://api:8000/v1/files/day/a%252Fb.jpeg"


def test_prefer_wait_and_the_chat_messages() -> None:
    cap = get_config().api.wait_timeout_s
    assert prefer_wait(None, cap) == 0 and prefer_wait("respond-async", cap) == 0
    assert prefer_wait("wait=5", cap) == 5 and prefer_wait("respond-async, wait=2.5", cap) == 2.5
    assert prefer_wait("wait=100000", cap) == cap
    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content=[{"type": "text", "text": "Hi"}]),
    ]
    assert chat_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    with pytest.raises(APIError) as caught:
        chat_messages([Message(role="user", content=[{"type": "image_url", "image_url": {}}])])
    assert caught.value.param == "messages.0.content"


def test_previews_are_spread_over_the_steps_before_the_last() -> None:
    assert preview_steps(0, 8) == []
    assert preview_steps(1, 8) == [4]
    assert preview_steps(3, 8) == [2, 4, 6]
    assert preview_steps(2, 60) == [20, 40]
    assert preview_steps(3, 2) == [1]  # never the last step: the final image follows
    assert preview_steps(3, 1) == []
    assert preview_steps(9, 100) == [25, 50, 75]  # at most 3


def test_compose_and_the_procfile_run_the_api() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    api = compose["services"]["api"]
    assert api["command"][:2] == ["omni-tasks", "api"]
    assert api["environment"]["OMNI_API_TOKEN"].startswith("${OMNI_API_TOKEN:?")
    assert api["environment"]["OMNI_API__WEBHOOK_SECRET"].startswith("${OMNI_WEBHOOK_SECRET:?")
    worker = compose["services"]["diffusion-worker"]
    output_dir = worker["environment"]["OMNI_OUTPUT_DIR"]
    assert api["environment"]["OMNI_OUTPUT_DIR"] == output_dir  # the images it serves
    assert (
        f"outputs:{output_dir}" in api["volumes"] and f"outputs:{output_dir}" in worker["volumes"]
    )
    procfile = (root / "Procfile").read_text().splitlines()
    assert "api: omni-tasks api --host 127.0.0.1 --port 8000" in procfile


def test_a_send_that_may_have_been_accepted_says_how_to_retry() -> None:
    exc = BrokerUnavailableError("r1", "lost the connection", may_be_accepted=True)
    keyed, unkeyed = from_core_error(exc, 1.0, keyed=True), from_core_error(exc, 1.0)
    assert keyed.status == unkeyed.status == 503
    assert "may have been accepted" in keyed.message and "r1" in keyed.message
    assert f"same {HEADER} is safe" in keyed.message
    assert "may run it twice" in unkeyed.message and HEADER in unkeyed.message


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def test_an_edit_keeps_the_input_size_rounded_to_the_models_multiple() -> None:
    assert input_size(png((32, 32))) == {"width": 32, "height": 32}
    assert input_size(png((100, 60))) == {"width": 96, "height": 64}
    assert input_size(png((5, 5))) == {"width": 16, "height": 16}
    assert input_size(png((4096, 1024))) == {"width": 2048, "height": 512}
    assert input_size(b"not an image") == {}  # refused later, naming `image`


def test_levels_are_counted_under_the_class_that_starts_there() -> None:
    config = CoreModuleConfig(scheduler=SchedulerConfig(scheduler_type=SchedulerType.PRIORITY))
    starts = class_levels(config)
    assert starts["high"] == 0 < starts["normal"] < starts["low"] == 9
    levels = {0: 1, starts["normal"]: 2, starts["normal"] + 1: 4, 9: 3}
    assert by_class(levels, starts) == {"high": 1, "normal": 6, "low": 3}
    fifo = class_levels(CoreModuleConfig(scheduler=SchedulerConfig()))
    assert by_class({0: 5}, fifo) == {"high": 0, "normal": 5, "low": 0}  # no classes

"""Every request type end to end: `.delay()`, `submit`, `OmniScheduler.process_request`,
on real `celery worker` processes running tiny vLLM and diffusers models."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers import KEYS, assert_png, eventually, publish_raw

from omni_tasks import (
    OmniScheduler,
    ProcessingError,
    ProcessingStage,
    create_diffusion_request,
    create_image_request,
    create_multimodal_request,
    create_text_request,
    encode_image_file,
    generate_image,
    generate_multimodal,
    generate_text,
    submit,
)
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.rejections import list_rejections

pytestmark = pytest.mark.slow
TIMEOUT = 180


def check_text(result: dict, max_tokens: int) -> None:
    assert set(result) >= {"request_id", "text", "usage", "finish_reason", "timings"}
    assert isinstance(result["text"], str) and result["text"]
    assert 0 < result["usage"]["completion_tokens"] <= max_tokens
    assert result["usage"]["prompt_tokens"] > 0
    assert result["finish_reason"] in ("length", "stop")
    assert result["timings"]["queued_s"] >= 0 and result["timings"]["run_s"] > 0


def check_image(result: dict, width: int, height: int, seed: int | None = None) -> None:
    assert set(result) >= {"request_id", "image_path", "width", "height", "seed", "steps"}
    assert (result["width"], result["height"]) == (width, height)
    if seed is not None:
        assert result["seed"] == seed
    assert result["timings"]["queued_s"] >= 0 and result["timings"]["run_s"] > 0
    assert_png(result["image_path"], width, height)


def test_text_through_delay(pools) -> None:
    result = generate_text.delay(prompt="hi", max_tokens=16, priority="high").get(TIMEOUT)
    check_text(result, 16)
    assert result["usage"]["completion_tokens"] == 16 and result["finish_reason"] == "length"
    assert result["engine"] == "vllm"


def test_greedy_text_is_deterministic(pools) -> None:
    a = generate_text.delay(prompt="same prompt", max_tokens=12, temperature=0).get(TIMEOUT)
    b = generate_text.delay(prompt="same prompt", max_tokens=12, temperature=0).get(TIMEOUT)
    assert a["text"] == b["text"]


def test_diffusion_through_delay(pools) -> None:
    result = generate_image.delay(
        prompt="a red fox", width=64, height=64, steps=4, seed=7, priority="low"
    ).get(TIMEOUT)
    check_image(result, 64, 64, seed=7)
    assert result["steps"] == 4 and result["steps_run"] == 4
    non_square = generate_image.delay(prompt="a fox", width=96, height=32, steps=2).get(TIMEOUT)
    check_image(non_square, 96, 32)


def test_same_seed_same_image(pools) -> None:
    a = generate_image.delay(prompt="owl", width=32, height=32, steps=2, seed=3).get(TIMEOUT)
    b = generate_image.delay(prompt="owl", width=32, height=32, steps=2, seed=3).get(TIMEOUT)
    with open(a["image_path"], "rb") as fa, open(b["image_path"], "rb") as fb:
        assert fa.read() == fb.read()


def test_image_edit_through_delay(pools) -> None:
    base = generate_image.delay(prompt="a fox", width=64, height=64, steps=4, seed=1).get(TIMEOUT)
    edit = generate_image.delay(
        prompt="the fox in snow",
        image=encode_image_file(base["image_path"]),
        strength=0.5,
        width=64,
        height=64,
        steps=4,
        seed=2,
    ).get(TIMEOUT)
    check_image(edit, 64, 64, seed=2)
    assert edit["request_type"] == "image"


def test_multimodal_through_delay_is_a_chain_across_pools(pools) -> None:
    result = generate_multimodal.delay(
        prompt="a lighthouse",
        max_tokens=12,
        width=64,
        height=64,
        steps=4,
        seed=5,
        priority="high",
    )
    value = result.get(TIMEOUT)
    check_image(value, 64, 64, seed=5)
    check_text(value, 12)
    assert value["image_prompt"]
    assert result.parent is not None and result.parent.successful()
    assert result.parent.result["image_prompt"] == value["image_prompt"]


def test_every_type_through_submit(pools, tmp_path) -> None:
    text = submit(create_text_request("hello", max_tokens=8)).get(TIMEOUT)
    check_text(text, 8)
    image = submit(create_diffusion_request("fox", width=32, height=32, steps=2)).get(TIMEOUT)
    check_image(image, 32, 32)
    edit = submit(
        create_image_request(
            "edit", image=encode_image_file(image["image_path"]), width=32, height=32, steps=2
        )
    ).get(TIMEOUT)
    check_image(edit, 32, 32)
    multi = submit(create_multimodal_request("cat", max_tokens=8, width=32, height=32, steps=2))
    check_image(multi.get(TIMEOUT), 32, 32)


def test_every_type_through_omni_scheduler(pools) -> None:
    async def run() -> list[dict]:
        scheduler = OmniScheduler()
        await scheduler.start()
        requests = [
            create_text_request("hello", max_tokens=8),
            create_diffusion_request("fox", width=32, height=32, steps=2),
            create_multimodal_request("cat", max_tokens=8, width=32, height=32, steps=2),
        ]
        for r in requests:
            assert await scheduler.schedule_request(r)
        results = await asyncio.gather(*(scheduler.process_request(r) for r in requests))
        assert all(r.processing_stage is ProcessingStage.COMPLETED for r in requests)
        edit = create_image_request(
            "edit", image=encode_image_file(results[1]["image_path"]), width=32, height=32, steps=2
        )
        results.append(await scheduler.process_request(edit))  # schedules it first
        status = eventually(lambda: (s := scheduler.get_status())["processed_requests"] >= 4 and s)
        assert status and status["queue_size"] == 0
        assert {w["queues"][0] for w in status["resource_status"]["workers"]} == {"ar", "diffusion"}
        assert scheduler.get_metrics()["average_processing_time"] > 0
        assert scheduler.get_health_status()["healthy"], scheduler.get_health_status()
        await scheduler.stop()
        return results

    text, image, multi, edit = asyncio.run(run())
    check_text(text, 8)
    check_image(image, 32, 32)
    check_image(multi, 32, 32)
    check_image(edit, 32, 32)


def test_worker_rejects_and_records_a_malformed_message(pools) -> None:
    bad_id = publish_raw("omni_tasks.generate_image", {"prompt": "fox", "width": 33}, "diffusion")
    from celery.result import AsyncResult

    bad = AsyncResult(bad_id)
    with pytest.raises(Exception, match="width"):
        bad.get(TIMEOUT)
    record = next(r for r in list_rejections(get_redis()) if r["task_id"] == bad_id)
    assert "width" in record["reason"] and json.loads(record["body"])["width"] == 33
    # The worker lives on.
    check_image(
        generate_image.delay(prompt="ok", width=32, height=32, steps=2).get(TIMEOUT), 32, 32
    )


def test_worker_refuses_a_pickled_message_and_keeps_serving(pools) -> None:
    task_id = publish_raw("omni_tasks.generate_text", {"prompt": "hi"}, "ar", serializer="pickle")
    from celery.result import AsyncResult

    with pytest.raises(Exception, match="content"):
        AsyncResult(task_id).get(TIMEOUT)
    record = next(r for r in list_rejections(get_redis()) if r["task_id"] == task_id)
    assert "pickle" in record["reason"]
    check_text(generate_text.delay(prompt="still here", max_tokens=4).get(TIMEOUT), 4)


def test_engine_side_timeout_fails_the_request(pools) -> None:
    expired_before = pool_counter("ar", "expired")

    async def run() -> None:
        scheduler = OmniScheduler()
        # Started at once (the pool is idle), then stopped by the engine at its deadline.
        request = create_text_request("x", max_tokens=2000, timeout_s=1.0)
        with pytest.raises(ProcessingError, match="(?i)time"):
            await scheduler.process_request(request, timeout=TIMEOUT)
        assert request.processing_stage is ProcessingStage.FAILED and request.errors

    asyncio.run(run())
    assert pool_counter("ar", "expired") == expired_before + 1


def test_a_request_past_its_deadline_is_never_started(pools) -> None:
    from celery.exceptions import TaskRevokedError

    expired_before = pool_counter("diffusion", "expired")
    result = generate_image.delay(prompt="too late", steps=2, timeout_s=0.001)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=TIMEOUT)
    assert result.state == "REVOKED"
    assert eventually(lambda: pool_counter("diffusion", "expired") == expired_before + 1)


def pool_counter(queue: str, name: str) -> int:
    from omni_tasks.coordination.client import get_redis

    return int(get_redis().hget(KEYS.stats(queue), name) or 0)

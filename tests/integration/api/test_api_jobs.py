"""The job API with `httpx`, against real workers and `omni-tasks api` processes:
submit and poll, `Prefer: wait`, Server-Sent Events (progress before the result),
cancel (running and queued), priorities from the body or `X-Priority`, images under
`output_dir` only, webhooks (signed, retried, delivered once another API process has
died), and 50 concurrent requests through two API processes."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import (  # noqa: F401
    WEBHOOK_SECRET,
    ApiServer,
    WebhookReceiver,
    api_factory,
    receiver,
)
from helpers import DIT_QUEUE, eventually, where
from PIL import Image

from omni_tasks import app
from omni_tasks.api import verify
from omni_tasks.coordination.client import get_redis

#: A few seconds of denoising on the tiny Flux model on a CPU.
LONG = {"type": "diffusion", "width": 512, "height": 512, "steps": 100}


@pytest.fixture(scope="module")
def api(pools, api_factory) -> ApiServer:  # noqa: F811
    return api_factory()


@pytest.fixture()
def http(api: ApiServer) -> Iterator[httpx.Client]:
    with api.client() as client:
        yield client


def submit(http: httpx.Client, status: int = 202, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    return response.json()


def until(http: httpx.Client, job_id: str, done: Any, timeout_s: float = 60) -> dict:
    found = eventually(
        lambda: (j := http.get(f"/v1/jobs/{job_id}").json()) and done(j) and j, timeout_s, 0.05
    )
    assert found, http.get(f"/v1/jobs/{job_id}").json()
    return found


def events_of(http: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    found = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                found.append((name, json.loads(line[len("data: ") :])))
    return found


def test_a_job_is_accepted_then_polled_to_its_image(http: httpx.Client) -> None:
    job = submit(http, type="diffusion", prompt="a fox", width=64, height=48, steps=4, seed=3)
    assert job["object"] == "job" and job["type"] == "diffusion"
    assert job["status"] in ("queued", "running")
    done = until(http, job["id"], lambda j: j["status"] == "succeeded")
    assert done["result"]["seed"] == 3 and done["error"] is None
    assert "image_path" not in done["result"]  # a path on the workers: never shown
    image = Image.open(io.BytesIO(http.get(done["image_url"]).content))
    assert (image.format, image.size) == ("PNG", (64, 48))


def test_prefer_wait_answers_the_ended_job(http: httpx.Client) -> None:
    wait = {"Prefer": "wait=60"}
    text = http.post(
        "/v1/jobs", json={"type": "text", "prompt": "hi", "max_tokens": 5}, headers=wait
    )
    assert text.status_code == 200 and text.json()["status"] == "succeeded"
    assert text.json()["result"]["usage"]["completion_tokens"] <= 5
    both = http.post(
        "/v1/jobs",
        json={"type": "multimodal", "prompt": "a lighthouse", "max_tokens": 8, "steps": 3},
        headers=wait,
    )
    assert both.status_code == 200, both.text
    job = both.json()
    assert job["status"] == "succeeded" and job["result"]["image_prompt"]
    assert job["image_url"].endswith(".png")
    timings, stages = job["result"]["timings"], job["result"]["stages"]
    # The request started with its AR stage: queued_s is started_at - created_at.
    assert timings["started_at"] == pytest.approx(stages["ar"]["started_at"], abs=1e-5)
    assert timings["queued_s"] == pytest.approx(stages["ar"]["queued_s"], abs=1e-5)
    created_at = timings["started_at"] - timings["queued_s"]
    assert job["created_at"] <= created_at <= job["created_at"] + 1
    runs = stages["ar"]["run_s"] + stages["dit"]["run_s"]
    assert timings["run_s"] == pytest.approx(runs, abs=1e-5)


def test_events_bring_progress_and_previews_before_the_result(http: httpx.Client) -> None:
    job = submit(
        http, type="diffusion", prompt="a storm", width=512, height=512, steps=60, partial_images=2
    )
    events = events_of(http, job["id"])
    names = [name for name, _ in events]
    assert names[-1] == "result" and events[-1][1]["status"] == "succeeded"
    progress = [data["progress"] for name, data in events if name == "progress"]
    assert progress, names
    assert all(p["steps"] == 60 for p in progress)
    steps = [p["step"] for p in progress]
    # Progress arrives while the job runs; the last step may be reported too.
    assert steps == sorted(steps) and steps[0] < 60 and steps[-1] <= 60
    previews = [data for name, data in events if name == "partial_image"]
    assert [p["index"] for p in previews] == [0, 1]
    assert [p["step"] for p in previews] == [20, 40]
    image = Image.open(io.BytesIO(base64.b64decode(previews[0]["b64_json"])))
    assert image.size == (512, 512)
    assert names.index("progress") < names.index("result")
    assert ("status", {"id": job["id"], "status": "succeeded"}) in events


def test_a_running_job_is_cancelled_at_a_step_boundary(http: httpx.Client) -> None:
    job = submit(http, prompt="cancel me while running", **LONG)
    until(http, job["id"], lambda j: j["progress"] is not None)
    cancelled = http.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 200
    done = until(http, job["id"], lambda j: j["status"] == "cancelled", 30)
    assert done["error"]["code"] == "cancelled"
    again = http.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_ended"
    message = again.json()["error"]["message"]
    assert message == f"job {job['id']} has already ended (cancelled): nothing to cancel"


def test_queued_jobs_keep_their_priority_and_are_cancelled_at_once(
    http: httpx.Client, pools: dict
) -> None:
    """With the diffusion worker not consuming, jobs stay queued: the header sets the
    priority unless the body does, and a cancelled one is `cancelled` right away."""
    hostname = pools["diffusion"].hostname
    for queue in ("diffusion", DIT_QUEUE):  # the pool's queue and its model's
        app.control.cancel_consumer(queue, destination=[hostname], reply=True)
    try:
        by_header = http.post(
            "/v1/jobs",
            json={"type": "diffusion", "prompt": "first"},
            headers={"X-Priority": "high"},
        ).json()
        by_body = http.post(
            "/v1/jobs",
            json={"type": "diffusion", "prompt": "second", "priority": "low"},
            headers={"X-Priority": "high"},
        ).json()
        client = get_redis()
        high, low = where(client, by_header["id"])[1], where(client, by_body["id"])[1]
        assert high < low  # level 0 is served first
        for job in (by_header, by_body):
            answer = http.delete(f"/v1/jobs/{job['id']}")
            assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    finally:
        for queue in ("diffusion", DIT_QUEUE):
            app.control.add_consumer(queue, destination=[hostname], reply=True)
    for job in (by_header, by_body):  # the worker skips them: never run
        assert app.AsyncResult(job["id"]).state == "REVOKED"


def test_files_are_only_images_under_output_dir(http: httpx.Client) -> None:
    job = submit(http, type="diffusion", prompt="a file", steps=2)
    url = until(http, job["id"], lambda j: j["status"] == "succeeded")["image_url"]
    name = url.split("/v1/files/", 1)[1]
    assert http.get(f"/v1/files/{name}").status_code == 200
    for bad in (
        "../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        ".hidden.png",
        f"{name[:-4]}.txt",
        "%2Fetc%2Fhosts.png",
        "nope/none.png",
    ):
        response = http.get(f"/v1/files/{bad}")
        assert response.status_code == 404, bad
        assert response.json()["error"]["code"] in ("file_not_found", None)


def test_a_webhook_is_signed_retried_and_carries_one_delivery_id(
    http: httpx.Client,
    receiver: WebhookReceiver,  # noqa: F811
) -> None:
    receiver.fail_first = 1  # the first attempt meets a 500
    job = submit(http, type="text", prompt="hook", max_tokens=4, webhook_url=receiver.url)
    got = eventually(lambda: len(receiver.for_job(job["id"])) >= 2, 30)
    assert got, receiver.received
    first, second = receiver.for_job(job["id"])[:2]
    for delivery in (first, second):
        assert verify(WEBHOOK_SECRET, delivery.body, delivery.headers["X-Omni-Signature"])
        assert delivery.json["type"] == "job.finished"
        assert delivery.json["job"]["status"] == "succeeded"
    assert first.headers["X-Omni-Delivery"] == second.headers["X-Omni-Delivery"]
    assert first.json["id"] == first.headers["X-Omni-Delivery"]
    assert (first.headers["X-Omni-Attempt"], second.headers["X-Omni-Attempt"]) == ("1", "2")
    assert not verify("another secret", first.body, first.headers["X-Omni-Signature"])
    webhook = until(http, job["id"], lambda j: j["webhook"]["status"] == "delivered")["webhook"]
    assert webhook == {"url": receiver.url, "status": "delivered", "attempts": 2}


def test_a_webhook_survives_the_api_process_that_accepted_it(
    api: ApiServer,
    api_factory,  # noqa: F811
    receiver: WebhookReceiver,  # noqa: F811
) -> None:
    doomed = api_factory()
    with doomed.client() as http:
        job = submit(
            http, prompt="outlive the api", webhook_url=receiver.url, **{**LONG, "steps": 40}
        )
    doomed.stop(kill=True)  # SIGKILL: nothing of it survives but what is in Redis
    got = eventually(lambda: receiver.for_job(job["id"]), 60, 0.2)
    assert got, "no API process delivered the webhook"
    delivery = got[0]
    assert verify(WEBHOOK_SECRET, delivery.body, delivery.headers["X-Omni-Signature"])
    assert delivery.json["job"]["status"] == "succeeded"


def test_50_concurrent_requests_through_two_api_processes(
    api: ApiServer,
    api_factory,  # noqa: F811
) -> None:
    second = api_factory()
    servers = [api, second]

    async def one(i: int, client: httpx.AsyncClient) -> tuple[int, Any]:
        if i % 3 == 0:
            body = {"prompt": f"image {i}", "size": "64x64", "seed": i, "num_inference_steps": 2}
            response = await client.post("/v1/images/generations", json=body)
        elif i % 3 == 1:
            body = {
                "model": "tiny-llama",
                "max_tokens": 6,
                "seed": i,
                "messages": [{"role": "user", "content": f"request {i}"}],
            }
            response = await client.post("/v1/chat/completions", json=body)
        else:
            response = await client.post(
                "/v1/jobs", json={"type": "probe", "prompt": str(i)}, headers={"Prefer": "wait=120"}
            )
        return response.status_code, response.json()

    async def run() -> list[tuple[int, Any]]:
        headers = {"Authorization": f"Bearer {api.token}"}
        clients = [httpx.AsyncClient(base_url=s.url, headers=headers, timeout=300) for s in servers]
        try:
            return await asyncio.gather(*(one(i, clients[i % 2]) for i in range(50)))
        finally:
            for client in clients:
                await client.aclose()

    answers = asyncio.run(run())
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200]
    ids = set()
    for i, (_, body) in enumerate(answers):
        if i % 3 == 0:
            image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
            assert image.size == (64, 64) and body["data"][0]["seed"] == i
        elif i % 3 == 1:
            assert body["choices"][0]["message"]["content"]
            assert 1 <= body["usage"]["completion_tokens"] <= 6
            ids.add(body["id"])
        else:
            assert body["status"] == "succeeded" and body["type"] == "probe"
            ids.add(body["id"])
    assert len(ids) == 50 - 17  # every answer is its own request's


def test_unknown_jobs_are_404(http: httpx.Client) -> None:
    for method in ("GET", "DELETE"):
        response = http.request(method, "/v1/jobs/no-such-job")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
    assert http.get("/v1/jobs/no-such-job/events").status_code == 404

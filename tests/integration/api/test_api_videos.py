"""OpenAI's `/v1/videos` through the official `openai` client, unmodified, against two
real diffusion workers (tiny-wan, tiny-wan-i2v) and two `omni-tasks api` processes on
one Redis: create, poll, download the MP4 (decoded with PyAV), its thumbnail and
spritesheet, the cursor list, delete (a running video is cancelled), bad fields named,
content before completion is 404, image-to-video from an upload and from a data URL,
remix, Server-Sent Events, a signed webhook, and video jobs on `/v1/jobs`."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import openai
import pytest
from api_support import (  # noqa: F401
    WEBHOOK_SECRET,
    ApiServer,
    WebhookReceiver,
    api_factory,
    receiver,
)
from conftest import clean_redis
from helpers import KEYS, eventually
from PIL import Image

from omni_tasks import app
from omni_tasks.api import verify
from omni_tasks.coordination.client import get_redis
from omni_tasks.dev.launcher import WorkerProcess, start_worker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),
]
T2V, I2V = "tiny-wan", "tiny-wan-i2v"
#: A 9-frame 64x64 video in 2 steps: well under a second on a CPU.
SMALL = {"size": "64x64", "extra_body": {"num_frames": 9, "steps": 2}}
#: Many seconds of denoising on a CPU, cancelled at a step boundary.
LONG = {"size": "256x256", "extra_body": {"num_frames": 33, "steps": 100}}


@pytest.fixture(scope="module")
def wan_workers(run_dir) -> Iterator[dict[str, WorkerProcess]]:
    """One worker per video model, both `-Q diffusion`, on an empty database."""
    clean_redis()
    logs = run_dir / "video-logs"
    workers = {
        model: start_worker("diffusion", logs, env={"OMNI_DIFFUSION__MODEL": model}, name=model)
        for model in (T2V, I2V)
    }
    try:
        for worker in workers.values():
            worker.wait_ready(600)
    except Exception:
        for worker in workers.values():
            worker.kill()
        raise
    yield workers
    for worker in workers.values():
        worker.stop()
    clean_redis()


@pytest.fixture(scope="module")
def api(wan_workers, api_factory) -> ApiServer:  # noqa: F811
    return api_factory()


@pytest.fixture(scope="module")
def api2(wan_workers, api_factory) -> ApiServer:  # noqa: F811
    return api_factory()


@pytest.fixture(scope="module")
def client(api: ApiServer) -> openai.OpenAI:
    return api.openai()


@pytest.fixture(scope="module")
def done(client: openai.OpenAI) -> Any:
    """One completed 9-frame 64x64 text-to-video video."""
    video = client.videos.create_and_poll(
        prompt="a fox runs", poll_interval_ms=50, **_merged(SMALL, seed=5)
    )
    assert video.status == "completed", video
    return video


def _merged(base: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**base, "extra_body": {**base["extra_body"], **extra}}


def until_ended(client: openai.OpenAI, video_id: str, timeout_s: float = 60) -> Any:
    def ended() -> Any:
        video = client.videos.retrieve(video_id)
        return video if video.status in ("completed", "failed") else None

    video = eventually(ended, timeout_s, 0.05)
    assert video is not None, client.videos.retrieve(video_id)
    return video


def decoded(mp4: bytes) -> tuple[int, int, int]:
    """(frames, width, height) of an MP4, as PyAV decodes it."""
    with av.open(io.BytesIO(mp4)) as container:
        frames = list(container.decode(video=0))
    return len(frames), frames[0].width, frames[0].height


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(out, format="PNG")
    return out.getvalue()


def test_a_video_is_created_polled_and_downloaded(client: openai.OpenAI, done: Any) -> None:
    assert (done.object, done.status, done.progress, done.error) == (
        "video",
        "completed",
        100,
        None,
    )
    assert (done.model, done.size, done.seconds, done.prompt) == (
        T2V,
        "64x64",
        "0.5625",
        "a fox runs",
    )
    assert done.created_at <= done.completed_at <= done.created_at + 60
    assert done.expires_at > done.completed_at and done.remixed_from_video_id is None
    mp4 = client.videos.download_content(done.id).content
    assert decoded(mp4) == (9, 64, 64)
    thumbnail = Image.open(
        io.BytesIO(client.videos.download_content(done.id, variant="thumbnail").content)
    )
    assert (thumbnail.format, thumbnail.size) == ("PNG", (64, 64))
    sheet = client.videos.download_content(done.id, variant="spritesheet").content
    assert Image.open(io.BytesIO(sheet)).format == "JPEG"


def test_a_second_api_process_serves_the_video(api2: ApiServer, done: Any) -> None:
    other = api2.openai()
    assert other.videos.retrieve(done.id).model_dump() == done.model_dump()
    assert decoded(other.videos.download_content(done.id).content) == (9, 64, 64)
    assert done.id in [v.id for v in other.videos.list(limit=100).data]


def test_a_video_created_on_one_process_is_followed_on_another(
    client: openai.OpenAI, api2: ApiServer
) -> None:
    video = client.videos.create(prompt="a heron", **SMALL)
    assert video.status in ("queued", "in_progress") and video.progress in range(100)
    finished = until_ended(api2.openai(), video.id)
    assert finished.status == "completed" and finished.seconds == video.seconds


def test_the_list_pages_by_cursor_in_either_order(client: openai.OpenAI) -> None:
    made = [client.videos.create(prompt=f"a wave {i}", **SMALL).id for i in range(3)]
    newest = client.videos.list(limit=2)
    assert [v.id for v in newest.data] == made[:0:-1] and newest.has_more
    assert newest.last_id == made[1]
    rest = client.videos.list(limit=2, after=newest.last_id)
    assert rest.data[0].id == made[0]
    every = [v.id for v in client.videos.list(limit=2)]  # the SDK follows the cursor
    assert len(every) == len(set(every)) and every[:3] == made[::-1]
    oldest_first = [v.id for v in client.videos.list(limit=100, order="asc")]
    assert oldest_first == every[::-1]
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.list(after="no-such-video")
    assert caught.value.body["param"] == "after"
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.list(limit=0)
    assert caught.value.body["param"] == "limit"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "65x64"}, "size"),
        ({"size": "big"}, "size"),
        ({"seconds": "soon"}, "seconds"),
        ({"seconds": "999"}, "seconds"),
        ({"extra_body": {"num_frames": 10}}, "num_frames"),
        ({"extra_body": {"steps": "many"}}, "steps"),
        ({"extra_body": {"colour": "red"}}, "colour"),
        ({"model": "no-such-model"}, "model"),
        ({"extra_body": {"input_reference": {"file_id": "file-1"}}}, "input_reference"),
        ({"input_reference": ("ref.txt", b"not an image", "text/plain")}, "input_reference"),
    ],
)
def test_a_bad_field_is_refused_by_name_before_anything_runs(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    listed = get_redis().zcard(KEYS.api_videos())
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.create(prompt="a bad one", **fields)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param, caught.value.body
    assert get_redis().zcard(KEYS.api_videos()) == listed


def test_a_running_video_has_no_content_and_delete_cancels_it(client: openai.OpenAI) -> None:
    video = client.videos.create(prompt="a long storm", **LONG)
    running = eventually(
        lambda: (v := client.videos.retrieve(video.id)).status == "in_progress" and v, 30
    )
    assert running, client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.videos.download_content(video.id)
    assert caught.value.body["code"] == "video_not_ready"
    started = time.monotonic()
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    assert time.monotonic() - started < 10  # it stopped at its next step
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert video.id not in [v.id for v in client.videos.list(limit=100).data]
    assert eventually(lambda: app.AsyncResult(video.id).state == "REVOKED", 30)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(video.id)


def test_deleting_a_completed_video_deletes_its_files(client: openai.OpenAI) -> None:
    video = until_ended(client, client.videos.create(prompt="a pond", **SMALL).id)
    result = app.AsyncResult(video.id).result
    paths = [result[f] for f in ("video_path", "thumbnail_path", "spritesheet_path")]
    assert all(Path(p).is_file() for p in paths)
    assert client.videos.delete(video.id).deleted
    assert not any(Path(p).exists() for p in paths)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)


def test_image_to_video_from_an_uploaded_file(client: openai.OpenAI) -> None:
    video = client.videos.create(
        prompt="the poster comes alive",
        input_reference=("poster.png", png_bytes(48, 32), "image/png"),
        extra_body={"num_frames": 5, "steps": 2},
    )
    assert (video.model, video.size) == (I2V, "48x32")  # the input's size
    assert until_ended(client, video.id).status == "completed"
    assert decoded(client.videos.download_content(video.id).content) == (5, 48, 32)


@pytest.mark.parametrize("wrapped", [False, True], ids=["string", "image_url"])
def test_image_to_video_from_a_data_url_in_json(
    api: ApiServer, client: openai.OpenAI, wrapped: bool
) -> None:
    url = "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()
    reference = {"image_url": url} if wrapped else url
    body = {"prompt": "a still", "input_reference": reference, "size": "32x32", "num_frames": 5}
    with api.client() as http:
        answer = http.post("/v1/videos", json={**body, "steps": 2})
        assert answer.status_code == 200, answer.text
        video = answer.json()
    assert video["model"] == I2V and video["status"] in ("queued", "in_progress")
    assert until_ended(client, video["id"]).status == "completed"
    assert decoded(client.videos.download_content(video["id"]).content) == (5, 32, 32)


def test_a_remix_keeps_the_settings_with_a_new_prompt(client: openai.OpenAI, done: Any) -> None:
    remix = client.videos.remix(done.id, prompt="a fox swims")
    assert remix.id != done.id and remix.remixed_from_video_id == done.id
    assert (remix.prompt, remix.model, remix.size, remix.seconds) == (
        "a fox swims",
        done.model,
        done.size,
        done.seconds,
    )
    assert until_ended(client, remix.id).status == "completed"
    assert decoded(client.videos.download_content(remix.id).content) == (9, 64, 64)
    with pytest.raises(openai.NotFoundError):
        client.videos.remix("no-such-video", prompt="x")


def test_events_and_a_signed_webhook(api: ApiServer, receiver: WebhookReceiver) -> None:  # noqa: F811
    body = {"prompt": "a kite", "size": "64x64", "num_frames": 9, "steps": 2}
    with api.client() as http:
        video = http.post("/v1/videos", json={**body, "webhook_url": receiver.url}).json()
        events = []
        with http.stream("GET", f"/v1/videos/{video['id']}/events") as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[len("data: ") :])))
    assert events[-1][0] == "video.completed" and events[-1][1]["progress"] == 100
    assert all(data["object"] == "video" for _, data in events)
    delivered = eventually(lambda: receiver.for_job(video["id"]), 30)
    assert delivered, receiver.received
    sent = delivered[0]
    assert verify(WEBHOOK_SECRET, sent.body, sent.headers["X-Omni-Signature"])
    assert sent.json["job"]["type"] == "video" and sent.json["job"]["status"] == "succeeded"
    assert "video_path" not in sent.json["job"]["result"]  # linked, never the worker's path
    assert sent.json["job"]["video_url"].endswith(f"/v1/videos/{sent.json['job']['id']}/content")


def test_an_idempotency_key_answers_the_same_video(client: openai.OpenAI) -> None:
    headers = {"Idempotency-Key": f"video-{time.time_ns()}"}
    first = client.videos.create(prompt="a lamp", extra_headers=headers, **SMALL)
    again = client.videos.create(prompt="a lamp", extra_headers=headers, **SMALL)
    assert again.id == first.id and again.created_at == first.created_at
    with pytest.raises(openai.ConflictError):
        client.videos.create(prompt="another lamp", extra_headers=headers, **SMALL)


def test_the_job_api_takes_video_jobs(api: ApiServer, client: openai.OpenAI) -> None:
    job = {"type": "video", "prompt": "a bell", "num_frames": 5, "width": 32, "height": 32}
    with api.client() as http:
        answer = http.post("/v1/jobs", json={**job, "steps": 2}, headers={"Prefer": "wait=60"})
        assert answer.status_code == 200, answer.text
        done_job = answer.json()
        assert done_job["status"] == "succeeded"
        assert "video_path" not in done_job["result"]  # a path on the workers: never shown
        mp4 = http.get(done_job["video_url"])
        assert mp4.headers["content-type"] == "video/mp4"
        thumbnail = http.get(done_job["thumbnail_url"])
        assert thumbnail.headers["content-type"] == "image/png"
    assert decoded(mp4.content) == (5, 32, 32)
    video = client.videos.retrieve(done_job["id"])
    assert (video.status, video.size, video.model) == ("completed", "32x32", T2V)

"""`Idempotency-Key` on the HTTP API, against real workers and `omni-tasks api`
processes: a keyed job sent four times at once is one job that runs once (one
`succeeded` line in the worker's log), another body under the key is 409 and leaves the
job as it was, other callers and unkeyed calls get their own ids; the official `openai`
client sending the key gets the same images and the same completion from one run; a
keyed call past the API's wait is 504 and left running, so its retry gets the result
of the one run; a malformed key is 400; a broker that cannot be reached is 503, and the
keyed retry then runs the job once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from api_support import TOKEN, ApiServer, api_factory, free_port  # noqa: F401
from helpers import eventually

from omni_tasks.api.idempotency import HEADER, caller_of, keyed_id
from omni_tasks.coordination.client import get_redis

TINY = {"type": "diffusion", "prompt": "a keyed fox", "width": 64, "height": 48, "steps": 2}
CHAT = [{"role": "user", "content": "Say hi."}]
#: A request that runs a few seconds on the tiny Flux model on a CPU.
LONG_IMAGE = {"size": "512x512", "extra_body": {"num_inference_steps": 100}}


@pytest.fixture(scope="module")
def api(pools, api_factory) -> ApiServer:  # noqa: F811
    return api_factory()


@pytest.fixture()
def http(api: ApiServer) -> Iterator[httpx.Client]:
    with api.client() as client:
        yield client


def new_key() -> str:
    return f"test-{uuid.uuid4()}"


def post_job(http: httpx.Client, key: str | None, body: dict[str, Any]) -> httpx.Response:
    headers = {HEADER: key} if key is not None else {}
    return http.post("/v1/jobs", json=body, headers=headers)


def runs(worker: Any, task_id: str) -> int:
    """How many times a worker ran `task_id` to success, by its log."""
    return worker.log_path.read_text(errors="replace").count(f"[{task_id}] succeeded")


def drain(http: httpx.Client, body: dict[str, Any]) -> None:
    """Run an unkeyed job behind what was sent before on the same pool and priority, so
    that a duplicate published earlier would have run by its end."""
    done = http.post("/v1/jobs", json=body, headers={"Prefer": "wait=60"})
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text


def ran_once(worker: Any, task_id: str) -> bool:
    assert eventually(lambda: runs(worker, task_id) >= 1, 30), f"{task_id} never ran"
    return runs(worker, task_id) == 1


def test_a_keyed_job_sent_at_once_four_times_is_one_job_run_once(
    api: ApiServer, http: httpx.Client, pools: dict
) -> None:
    key = new_key()

    def send(_: int) -> httpx.Response:
        with api.client() as own:
            return post_job(own, key, TINY)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, range(4)))
    assert all(a.status_code in (200, 202) for a in answers), [a.text for a in answers]
    jobs = [a.json() for a in answers]
    job_id = keyed_id(caller_of(TOKEN), key)
    assert {j["id"] for j in jobs} == {job_id}
    assert len({j["created_at"] for j in jobs}) == 1  # the first call's record, kept
    done = eventually(lambda: http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", 60)
    assert done, http.get(f"/v1/jobs/{job_id}").text
    again = post_job(http, key, TINY)  # a retry after the end: the same job, ended
    assert again.json()["id"] == job_id and again.json()["status"] == "succeeded"

    other = post_job(http, key, {**TINY, "steps": 3})
    assert other.status_code == 409, other.text
    error = other.json()["error"]
    assert error["param"] == HEADER and error["code"] == "idempotency_key_reused"
    assert error["type"] == "invalid_request_error" and HEADER in error["message"]
    kept = http.get(f"/v1/jobs/{job_id}").json()  # the conflict left the job as it was
    assert kept["status"] == "succeeded" and kept["created_at"] == jobs[0]["created_at"]

    unkeyed = [post_job(http, None, TINY).json()["id"] for _ in range(2)]
    assert len({*unkeyed, job_id}) == 3
    drain(http, TINY)
    assert ran_once(pools["diffusion"], job_id)


def test_keys_are_scoped_by_caller_and_the_token_is_never_kept(
    api: ApiServer,
    http: httpx.Client,
    api_factory,  # noqa: F811
) -> None:
    key, probe = new_key(), {"type": "probe", "prompt": "scoped"}
    other, open_ = api_factory(token="another-token"), api_factory(token=None)
    ids = {}
    for server in (api, other, open_):
        with server.client() as client:
            answer = post_job(client, key, probe)
            assert answer.status_code in (200, 202), answer.text
            ids[server.token] = answer.json()["id"]
    assert len(set(ids.values())) == 3
    assert all(job_id == keyed_id(caller_of(token), key) for token, job_id in ids.items())
    redis = get_redis()
    stored = [k for k in redis.scan_iter(match="*api:*", count=1000)]
    assert stored and not any(TOKEN in k or "another-token" in k for k in stored)


def test_the_openai_client_gets_the_same_images_from_one_run(
    api: ApiServer, http: httpx.Client, pools: dict
) -> None:
    client, key = api.openai(max_retries=2), new_key()
    ask: dict[str, Any] = {
        "prompt": "a keyed lighthouse",
        "size": "64x64",
        "n": 2,
        "extra_body": {"num_inference_steps": 2},
        "extra_headers": {HEADER: key},
    }
    first = client.images.generate(**ask)
    second = client.images.generate(**ask)
    assert [d.b64_json for d in second.data] == [d.b64_json for d in first.data]
    assert [d.model_extra["seed"] for d in second.data] == [
        d.model_extra["seed"] for d in first.data
    ]
    with pytest.raises(openai.ConflictError) as caught:  # not retried: x-should-retry
        client.images.generate(**{**ask, "n": 1})
    assert caught.value.param == HEADER
    drain(http, {**TINY, "width": 64, "height": 64})
    base = keyed_id(caller_of(TOKEN), key)
    assert all(ran_once(pools["diffusion"], task_id) for task_id in (base, f"{base}-1"))


def test_the_openai_client_gets_the_same_completion_from_one_run(
    api: ApiServer, http: httpx.Client, pools: dict
) -> None:
    client, key = api.openai(), new_key()
    ask: dict[str, Any] = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 4}
    first = client.chat.completions.create(**ask, extra_headers={HEADER: key})
    second = client.chat.completions.create(**ask, extra_headers={HEADER: key})
    assert second.id == first.id
    assert second.choices[0].message.content == first.choices[0].message.content
    with pytest.raises(openai.ConflictError):
        client.chat.completions.create(**{**ask, "max_tokens": 5}, extra_headers={HEADER: key})
    drain(http, {"type": "text", "prompt": "after", "max_tokens": 2})
    assert ran_once(pools["ar"], first.id.removeprefix("chatcmpl-"))


def test_a_keyed_call_past_the_wait_is_504_and_its_retry_gets_the_result(
    api: ApiServer,
    pools: dict,
    api_factory,  # noqa: F811
) -> None:
    impatient, key = api_factory(OMNI_API__WAIT_TIMEOUT_S="1"), new_key()
    ask: dict[str, Any] = {**LONG_IMAGE, "prompt": "a keyed slow one"}
    with pytest.raises(openai.InternalServerError) as caught:
        impatient.openai().images.generate(**ask, extra_headers={HEADER: key})
    worker_log = pools["diffusion"].log_path.read_text(errors="replace")[-3000:]
    assert caught.value.status_code == 504, (caught.value.message, worker_log)
    assert "still runs" in caught.value.message
    retried = api.openai().images.generate(**ask, extra_headers={HEADER: key})
    assert retried.data[0].b64_json
    assert ran_once(pools["diffusion"], keyed_id(caller_of(TOKEN), key))


@pytest.mark.parametrize("key", ["k" * 256, b"caf\xc3\xa9", ""], ids=["long", "utf8", "empty"])
def test_a_malformed_key_is_400_naming_it(http: httpx.Client, key: Any) -> None:
    answer = http.post("/v1/jobs", json=TINY, headers={HEADER: key})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == HEADER and error["type"] == "invalid_request_error"


def test_an_unreachable_broker_is_503_and_the_keyed_retry_runs_once(
    api: ApiServer,
    http: httpx.Client,
    pools: dict,
    api_factory,  # noqa: F811
) -> None:
    cut_off = api_factory(OMNI_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    key = new_key()
    with cut_off.client() as client:
        refused = post_job(client, key, TINY)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"]
    error = refused.json()["error"]
    assert error["code"] == "broker_unavailable" and error["type"] == "service_unavailable"
    assert "nothing was accepted" in error["message"] and "retrying is safe" in error["message"]
    job_id = keyed_id(caller_of(TOKEN), key)
    assert http.get(f"/v1/jobs/{job_id}").status_code == 404  # no job was left behind
    retried = post_job(http, key, TINY)  # the key was given back: the retry is accepted
    assert retried.status_code == 202 and retried.json()["id"] == job_id
    drain(http, TINY)
    assert ran_once(pools["diffusion"], job_id)

"""Models per pool on a real cluster: two diffusion workers, both started with
`-Q diffusion`, worker A serving `tiny-flux` and worker B serving `tiny-qwen-image`
(another model family), and `flux-c` registered but served by no one.

Requests naming each model run only on a worker serving it, and their results say which
model ran them; a foreign Celery client (never importing omni_tasks) sending to the
shared `diffusion` queue, or straight to a model's queue, gets the same; a message that
lands on a worker of another model is passed on; an unregistered model is refused
(producers raise, workers record a foreign message); a registered model no worker
serves waits, and health, status, Prometheus and the HTTP API say so.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from conftest import clean_redis
from helpers import KEYS, assert_png, foreign, queued_messages

from omni_tasks import (
    OmniScheduler,
    RequestValidationError,
    app,
    cancel,
    create_diffusion_request,
    generate_image,
    generate_multimodal,
    get_config,
    set_config,
    submit,
)
from omni_tasks.config import ModelEntry
from omni_tasks.coordination import keys, ledger
from omni_tasks.coordination.client import get_redis
from omni_tasks.coordination.rejections import list_rejections
from omni_tasks.dev.launcher import WorkerProcess, start_worker
from omni_tasks.metrics import ClusterCollector

pytestmark = pytest.mark.slow
TIMEOUT = 240
IMAGE = {"width": 32, "height": 32, "steps": 2}
UNSERVED = "flux-c"
QWEN = "tiny-qwen-image"


def registry(tiny_flux_dir: Path) -> dict[str, Any]:
    return {QWEN: {}, UNSERVED: {"path": str(tiny_flux_dir)}}


@pytest.fixture(scope="module")
def cluster(tiny_models, tiny_flux_dir: Path, run_dir: Path) -> Iterator[dict[str, WorkerProcess]]:
    """Workers A (tiny-flux) and B (tiny-qwen-image), and this process's config with the same
    registry (producers and workers share it)."""
    models = registry(tiny_flux_dir)
    original = get_config()
    entries = {name: ModelEntry(**entry) for name, entry in models.items()}
    set_config(replace(original, models=entries))
    clean_redis()
    shared = {"OMNI_MODELS": json.dumps(models)}
    logs = run_dir / "model-logs"
    workers = {
        "tiny-flux": start_worker("diffusion", logs, env=shared, name="model-a"),
        QWEN: start_worker(
            "diffusion",
            logs,
            env={**shared, "OMNI_DIFFUSION__MODEL": QWEN},
            name="model-b",
        ),
    }
    try:
        for worker in workers.values():
            worker.wait_ready(600)
        yield workers
    finally:
        for worker in workers.values():
            worker.stop()
        set_config(original)
        clean_redis()


def ran_on(task_id: str) -> str:
    """The hostname of the worker that stored a task's result (`result_extended`)."""
    return str(app.backend.get_task_meta(task_id)["worker"])


def test_requests_run_only_on_a_worker_serving_their_model(cluster) -> None:
    hosts = {model: worker.hostname for model, worker in cluster.items()}
    asked = [
        None,
        QWEN,
        "tiny-flux",
        QWEN,
        None,
        QWEN,
        "tiny-flux",
        QWEN,
    ]
    sent = []
    for i, model in enumerate(asked):
        fields = {"prompt": f"interleaved {i}", "seed": i, **IMAGE}
        if model is not None:
            fields["model"] = model
        sent.append(generate_image.delay(**fields))
    for model, result in zip(asked, sent, strict=True):
        value = result.get(TIMEOUT)
        expected = model or "tiny-flux"
        assert value["model"] == expected
        assert ran_on(result.id) == hosts[expected]
        assert_png(value["image_path"], 32, 32)


def test_a_message_in_another_models_queue_is_passed_on(cluster) -> None:
    """Sent (by an omni-tasks producer, with an explicit queue) to worker A's model
    queue, a tiny-qwen-image request is passed on to tiny-qwen-image's queue and runs on B, once."""
    a_queue = keys.model_queue("diffusion", "tiny-flux")
    sent = generate_image.apply_async(
        kwargs={"prompt": "passed on", "model": QWEN, **IMAGE},
        queue=a_queue,
        priority=3,
    )
    value = sent.get(TIMEOUT)
    assert value["model"] == QWEN and ran_on(sent.id) == cluster[QWEN].hostname
    # Its ledger entry (what the reaper would publish again) follows it, same priority.
    options = ledger.entry(get_redis(), sent.id)["options"]
    assert (options["queue"], options["priority"]) == ("diffusion.tiny-qwen-image", 3)


def test_a_foreign_client_names_the_model(cluster) -> None:
    b = cluster[QWEN].hostname
    a = cluster["tiny-flux"].hostname
    image = {"prompt": "from elsewhere", **IMAGE}
    spec = [
        # The shared queue, with and without a broker priority: B only.
        {"task": "omni_tasks.generate_image", "kwargs": {**image, "model": QWEN},
         "queue": "diffusion", "priority": 5},
        {"task": "omni_tasks.generate_image", "kwargs": {**image, "model": QWEN, "seed": 2},
         "queue": "diffusion"},
        # Straight to B's model queue.
        {"task": "omni_tasks.generate_image", "kwargs": {**image, "model": QWEN, "seed": 3},
         "queue": "diffusion.tiny-qwen-image", "priority": 5},
        # To A's model queue while naming B's model: A passes it on.
        {"task": "omni_tasks.generate_image", "kwargs": {**image, "model": QWEN, "seed": 4},
         "queue": "diffusion.tiny-flux", "priority": 5},
        # No model on the shared queue: whichever worker takes it runs it.
        {"task": "omni_tasks.generate_image", "kwargs": {**image, "seed": 5},
         "queue": "diffusion", "priority": 5},
        # An unregistered model: refused and recorded.
        {"task": "omni_tasks.generate_image", "kwargs": {**image, "model": "nope"},
         "queue": "diffusion", "priority": 5},
    ]  # fmt: skip
    ids = foreign("send", json.dumps(spec))
    outcomes = foreign("wait", json.dumps(ids))
    *served, anyone, refused = outcomes
    for outcome in served:
        assert outcome["result"]["model"] == QWEN, outcome
        assert ran_on(outcome["id"]) == b
    host = ran_on(anyone["id"])
    assert anyone["result"]["model"] == (QWEN if host == b else "tiny-flux")
    assert host in (a, b)
    assert refused["error"] == "RequestValidationError" and refused["args"][0] == "model"
    assert QWEN in refused["args"][1] and UNSERVED in refused["args"][1]
    record = next(r for r in list_rejections(get_redis(), 1000) if r["task_id"] == refused["id"])
    assert "unknown diffusion model 'nope'" in record["reason"]


def test_an_unregistered_model_is_refused_before_anything_is_enqueued(cluster) -> None:
    client = get_redis()
    before = client.zcard(KEYS.admitted("diffusion"))
    for send in (
        lambda: generate_image.delay(prompt="x", model="nope"),
        lambda: app.send_task("omni_tasks.generate_image", kwargs={"prompt": "x", "model": "nope"}),
        lambda: generate_multimodal.delay(prompt="x", model="nope"),
        lambda: submit(create_diffusion_request("x", model="nope")),
    ):
        with pytest.raises(RequestValidationError) as info:
            send()
        assert info.value.field == "model"
        assert "registered: flux-c, tiny-flux, tiny-qwen-image" in info.value.message
    scheduler = OmniScheduler()
    with pytest.raises(RequestValidationError):
        asyncio.run(scheduler.schedule_request(create_diffusion_request("x", model="nope")))
    assert client.zcard(KEYS.admitted("diffusion")) == before
    assert not any(client.exists(k) for k in keys.queue_keys("diffusion.nope"))


def test_a_model_no_worker_serves_waits_and_is_named(cluster) -> None:
    scheduler = OmniScheduler()
    dit = get_config().diffusion
    # No video or audio worker here.
    unserved = sorted([UNSERVED, dit.video_model, dit.video_image_model, dit.audio_model])
    assert sorted(scheduler.get_health_status()["unserved_models"]) == unserved
    waiting = generate_image.delay(prompt="waits", model=UNSERVED, **IMAGE)
    try:
        queue = keys.model_queue("diffusion", UNSERVED)
        assert [m["headers"]["id"] for _, m in queued_messages(get_redis(), queue)] == [waiting.id]
        time.sleep(1)  # time for a worker of another model to take it, wrongly
        assert AsyncResult(waiting.id).state == "PENDING"  # no worker took it
        health = scheduler.get_health_status()
        assert sorted(health["unserved_models"]) == unserved
        assert any(UNSERVED in issue for issue in health["issues"])
        assert not any(dit.video_model in issue for issue in health["issues"])  # none waits
        models = scheduler.get_status()["models"]
        assert models["tiny-flux"]["workers"] == [cluster["tiny-flux"].hostname]
        assert models[QWEN]["workers"] == [cluster[QWEN].hostname]
        assert models[UNSERVED]["workers"] == [] and sum(models[UNSERVED]["queued"].values()) == 1
        depth = {
            (s.labels["model"], s.labels["level"]): s.value
            for family in ClusterCollector().collect()
            if family.name == "omni_model_queue_depth"
            for s in family.samples
        }
        assert sum(v for (model, _), v in depth.items() if model == UNSERVED) == 1
        pool = scheduler.get_status()["queues"]["diffusion"]
        assert sum(pool.values()) >= 1  # the pool's figure counts its models' queues
    finally:
        cancel(waiting.id)
        for key in keys.queue_keys(keys.model_queue("diffusion", UNSERVED)):
            get_redis().delete(key)


def test_one_models_cache_never_serves_another(cluster) -> None:
    """The DiT cache keys name the model: the same picture asked of each model is
    computed by each (a repeat to the same model is a latents hit, on its worker)."""
    fields = {"prompt": "same picture", "seed": uuid.uuid4().int % 1000, **IMAGE}
    a = generate_image.delay(**fields).get(TIMEOUT)
    b = generate_image.delay(**fields, model=QWEN).get(TIMEOUT)
    again = generate_image.delay(**fields, model=QWEN)
    assert (a["model"], b["model"]) == ("tiny-flux", QWEN)
    assert a["cache"]["latents"] == b["cache"]["latents"] == "miss"
    assert again.get(TIMEOUT)["cache"]["latents"] == "hit"
    assert ran_on(again.id) == cluster[QWEN].hostname

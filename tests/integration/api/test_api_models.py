"""The HTTP API with several diffusion models: a real `omni-tasks api` process and one
real diffusion worker serving `flux-b` (the tiny checkpoint registered under another
name), the pool's default `tiny-flux` served by no one. `/v1/models` lists what live
workers serve; a request naming an unregistered model is 400 naming `model`; one naming
a registered model that no live worker serves is accepted and waits in its queue."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import ApiServer, api_factory  # noqa: F401
from conftest import clean_redis

from omni_tasks.coordination import keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.dev.launcher import WorkerProcess, start_worker

pytestmark = pytest.mark.slow
IMAGE = {"prompt": "over http", "size": "32x32", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def served(tiny_flux_dir: Path, run_dir: Path) -> Iterator[dict[str, str]]:
    """The registry the API and the worker share, with a worker serving flux-b."""
    env = {"OMNI_MODELS": json.dumps({"flux-b": {"path": str(tiny_flux_dir)}})}
    clean_redis()
    worker: WorkerProcess = start_worker(
        "diffusion", run_dir / "logs", env={**env, "OMNI_DIFFUSION__MODEL": "flux-b"}
    )
    try:
        worker.wait_ready(600)
        yield env
    finally:
        worker.stop()
        clean_redis()


def test_models_are_listed_checked_and_routed(served, api_factory) -> None:  # noqa: F811
    api: ApiServer = api_factory(**served)
    with api.client() as http:
        listed = {m["id"]: m["pool"] for m in http.get("/v1/models").json()["data"]}
        assert listed == {"flux-b": "diffusion"}
        done = http.post("/v1/images/generations", json={**IMAGE, "model": "flux-b"})
        assert done.status_code == 200, done.text
        for path, body in (
            ("/v1/images/generations", {**IMAGE, "model": "nope"}),
            ("/v1/jobs", {"type": "diffusion", "prompt": "x", "model": "nope"}),
            ("/v1/jobs", {"type": "multimodal", "prompt": "x", "model": "nope"}),
        ):
            refused = http.post(path, json=body)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == "model" and error["message"].startswith("model: ")
            assert "flux-b" in error["message"]  # the registered names
        job = {"type": "diffusion", "prompt": "x", "model": "tiny-flux", "width": 32}
        waits = http.post("/v1/jobs", json=job)  # registered, served by no live worker
        assert waits.status_code == 202, waits.text
        assert waits.json()["status"] == "queued"
        queue = keys.model_queue("diffusion", "tiny-flux")
        assert sum(get_redis().llen(k) for k in keys.queue_keys(queue)) == 1
        assert http.delete(f"/v1/jobs/{waits.json()['id']}").status_code == 200

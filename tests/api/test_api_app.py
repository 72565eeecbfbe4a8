"""An app serves with the config it was made with, whatever the process config is by
then: the names its requests may use (its `loras`) and the keys it writes (its
`key_prefix`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from omni_tasks.api.app import create_app
from omni_tasks.config import get_config, set_config
from omni_tasks.coordination.keyspace import keyspace

PREFIX = "apitest"


@pytest.fixture()
def own_app(redis_client) -> Iterator[TestClient]:
    """An app on a config of its own (one LoRA, another key prefix); the process config
    is set back to the one without them before the app serves."""
    process = get_config()
    own = replace(process, loras={"sepia": "loras/sepia"}, key_prefix=PREFIX)
    app = create_app(own)
    set_config(process)
    try:
        with TestClient(app) as client:
            yield client
    finally:
        set_config(process)


def test_lora_names_are_checked_against_the_apps_config(own_app: TestClient) -> None:
    body = {"type": "diffusion", "prompt": "a fox"}
    known = own_app.post("/v1/jobs", json={**body, "lora": ["sepia"]})
    assert known.status_code == 503, known.text  # registered here: no worker is live
    assert known.json()["error"]["code"] == "no_live_worker"
    unknown = own_app.post("/v1/jobs", json={**body, "lora": ["ink"]})
    assert unknown.status_code == 400, unknown.text
    assert "registered: sepia" in unknown.json()["error"]["message"]
    video = own_app.post("/v1/videos", json={"prompt": "a fox", "lora": ["sepia"]})
    assert video.status_code == 503, video.text
    video = own_app.post("/v1/videos", json={"prompt": "a fox", "lora": ["ink"]})
    assert video.status_code == 400 and "registered: sepia" in video.text
    given = own_app.post("/v1/jobs", json={**body, "registries": {"loras": {"ink": "/x"}}})
    assert given.status_code == 400 and given.json()["error"]["param"] == "registries"


def test_the_app_writes_its_keys_under_its_own_prefix(own_app: TestClient, redis_client) -> None:
    sent = own_app.post(
        "/v1/files", files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "batch"}
    )
    assert sent.status_code == 200, sent.text
    file_id = sent.json()["id"]
    assert redis_client.exists(keyspace(PREFIX).api_file(file_id))
    assert not redis_client.exists(keyspace(get_config().key_prefix).api_file(file_id))
    listed = own_app.get("/v1/files").json()["data"]
    assert [f["id"] for f in listed] == [file_id]

"""`GET /v1/status` and the page's files on a real `omni-tasks api` process: the page
and its files answer without the token and with a strict Content-Security-Policy, every
data call needs the token, and the status counts what waits per pool, level and
priority class, with the Flower and Grafana links the config gives."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from api_support import TOKEN, ApiServer, api_factory  # noqa: F401
from conftest import clean_redis

from omni_tasks import generate_speech, generate_text
from omni_tasks.api.page import CSP


@pytest.fixture(scope="module")
def api(api_factory: Any) -> ApiServer:  # noqa: F811
    env = {
        "OMNI_API__FLOWER_URL": "http://flower.example:5555",
        "OMNI_API__GRAFANA_URL": "https://grafana.example/d/omni",
    }
    return api_factory(**env)


def test_the_page_needs_no_token_and_sets_a_strict_policy(api: ApiServer) -> None:
    page = httpx.get(f"{api.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert "frame-ancestors 'none'" in CSP
    script = httpx.get(f"{api.url}/ui/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    for hidden in ("/ui/..%2Fpage.py", "/ui/missing.js", "/ui/__init__.py"):
        assert httpx.get(f"{api.url}{hidden}").status_code == 404, hidden
    assert httpx.post(f"{api.url}/").status_code in (401, 405)  # only GET is open
    assert httpx.get(f"{api.url}/v1/status").status_code == 401
    assert httpx.get(f"{api.url}/v1/models").status_code == 401


def test_the_status_counts_what_waits_per_class(api: ApiServer) -> None:
    clean_redis()
    try:
        generate_text.delay(prompt="waits high", priority="high")
        generate_text.delay(prompt="waits low", priority="low")
        generate_speech.delay(input="waits too.", priority="normal")
        with api.client() as http:
            status = http.get("/v1/status").json()
    finally:
        clean_redis()
    assert status["object"] == "status" and set(status["pools"]) == {"ar", "diffusion", "speech"}
    ar = status["pools"]["ar"]
    assert ar["waiting"] == 2 and ar["classes"] == {"high": 1, "normal": 0, "low": 1}
    assert sum(ar["levels"].values()) == 2 and ar["workers"] == 0
    assert status["pools"]["speech"]["classes"]["normal"] == 1
    assert not status["healthy"]  # work waits and no worker reads the queues
    assert any("'ar'" in issue for issue in status["issues"])
    assert status["links"] == {
        "flower": "http://flower.example:5555",
        "grafana": "https://grafana.example/d/omni",
    }
    assert {"dit_cache", "lora", "rejected", "stranded", "models", "workers"} <= set(status)
    assert "tiny-flux" in status["models"]

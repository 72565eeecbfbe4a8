"""The page of `GET /` in a real headless Chromium, driven through the DevTools
protocol (`tests/browser/cdp.py`), against a real diffusion worker and an `omni-tasks
api` process: the token asked once and kept for the tab; an image job with its previews
and then its final image; a long job cancelled while it runs; the gallery's cache and
timings reports; the operations view of `v1/status` with its links; no console errors.
Without a token (or with a wrong one) the page shows a 401 and nothing of the cluster.
Under a path prefix, behind a reverse proxy that strips it, a job runs to its image.

`OMNI_WRITE_SCREENSHOTS=1` writes docs/playground.png and docs/operations.png.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from api_support import TOKEN, ApiServer, api_factory  # noqa: F401
from browser.cdp import Browser, Page, find_chromium
from PIL import Image

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (the Debian package `chromium`)"),
]

SCREENSHOTS = os.environ.get("OMNI_WRITE_SCREENSHOTS") == "1"
DOCS = Path(__file__).resolve().parents[3] / "docs"
FLOWER = "http://flower.example:5555"
GRAFANA = "http://grafana.example:3000/d/omni"
#: Headers a proxy does not pass on (hop by hop), and Host, which it sets.
HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host"})


class PrefixProxy:
    """A reverse proxy serving the API under /omni/ with the prefix stripped (nginx's
    `location /omni/ { proxy_pass http://api/; }`), passing answers on as they come
    (the events stream), and recording the paths asked for."""

    PREFIX = "/omni"

    def __init__(self) -> None:
        self.upstream: int | None = None
        self.paths: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                proxy.forward(self)

            do_POST = do_DELETE = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.PREFIX}"

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        if not handler.path.startswith(self.PREFIX + "/") or self.upstream is None:
            handler.send_error(404)
            return
        self.paths.append(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP}
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=120)
        try:
            path = handler.path[len(self.PREFIX) :]
            upstream.request(handler.command, path, body=body, headers=headers)
            answer = upstream.getresponse()
            handler.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in HOP:
                    handler.send_header(name, value)
            handler.end_headers()  # HTTP/1.0: the body ends when the connection does
            while chunk := answer.read1(65536):
                handler.wfile.write(chunk)
                handler.wfile.flush()
        except (ConnectionError, TimeoutError):
            pass  # the page dropped a stream it no longer follows
        finally:
            upstream.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def proxy() -> Iterator[PrefixProxy]:
    found = PrefixProxy()
    yield found
    found.stop()


@pytest.fixture(scope="module")
def diffusion_pool(pools: dict) -> None:
    """The shared pools: the diffusion worker the page's jobs run on."""


@pytest.fixture(scope="module")
def api(diffusion_pool: None, api_factory, proxy: PrefixProxy) -> ApiServer:  # noqa: F811
    # One API for every test: its public_url is the proxy's (the prefix test), and
    # pages loaded from its own port fetch its files on their own origin instead.
    server = api_factory(
        OMNI_API__PUBLIC_URL=proxy.public_url,
        OMNI_API__FLOWER_URL=FLOWER,
        OMNI_API__GRAFANA_URL=GRAFANA,
    )
    proxy.upstream = server.port
    return server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    found = Browser(CHROMIUM)
    yield found
    found.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    """A new tab: its own sessionStorage, so no token yet."""
    tab = browser.new_page()
    tab.send(
        "Emulation.setDeviceMetricsOverride",
        width=1360,
        height=900,
        deviceScaleFactor=1,
        mobile=False,
    )
    yield tab
    tab.close()


def js(value: object) -> str:
    return json.dumps(value)


def open_page(page: Page, url: str, token: str) -> None:
    """Load the page and answer its token dialog."""
    page.navigate(url)
    page.wait_for("document.querySelector('#token-dialog').open")
    assert page.evaluate("document.querySelector('#main').hidden")
    page.type("#token-input", token)
    page.click("#token-submit")


def models_listed(page: Page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('#f-model option')].map(o => o.value)")


def submit_image(page: Page, prompt: str, **fields: int) -> str:
    """Fill the form for an image job and submit it; the new job's id."""
    page.choose("#f-type", "diffusion")
    page.type("#f-prompt", prompt)
    for name, value in fields.items():
        page.type(f"#f-{name}", str(value))
    before = page.evaluate("document.querySelector('#job-title').title")
    page.click("#submit")
    return page.wait_for(
        f"(t => t !== {js(before)} && t)(document.querySelector('#job-title').title)", 30
    )


def final_image_width(page: Page, timeout_s: float = 60) -> int:
    return page.wait_for("document.querySelector('#output img.result')?.naturalWidth", timeout_s)


def job_log(page: Page) -> list[str]:
    """The panel's event log, without the times."""
    return page.evaluate("[...document.querySelectorAll('#job-log li')].map(l => l.dataset.text)")


def status_of_panel(page: Page) -> str:
    return page.evaluate("document.querySelector('#job-status').textContent")


def test_the_playground_runs_a_job_cancels_one_and_shows_operations(
    page: Page, api: ApiServer, proxy: PrefixProxy
) -> None:
    open_page(page, f"{api.url}/", TOKEN)
    page.wait_for("document.querySelectorAll('#f-model option').length > 1")
    assert "tiny-flux" in models_listed(page)  # from v1/models
    assert page.evaluate("sessionStorage.getItem('omni.token')") == TOKEN
    assert TOKEN not in page.evaluate("location.href")
    # The fields follow the type.
    page.choose("#f-type", "speech")
    assert page.evaluate("document.querySelector('#f-width').closest('label').hidden")
    assert not page.evaluate("document.querySelector('#f-voice').closest('label').hidden")
    assert page.evaluate("document.querySelector('#prompt-label').textContent") == "Text to speak"

    # An image job: previews arrive, then the final image, fetched with the token.
    job_id = submit_image(
        page, f"a fox {uuid.uuid4().hex[:6]}", width=64, height=64, steps=6, seed=5, partials=2
    )
    assert final_image_width(page) == 64
    assert page.evaluate("document.querySelector('#output img.result').naturalHeight") == 64
    assert page.evaluate("document.querySelectorAll('#previews img').length") >= 1
    assert page.evaluate("document.querySelector('#previews img').naturalWidth") == 64
    log = job_log(page)
    first_preview = next(i for i, line in enumerate(log) if line.startswith("preview "))
    assert first_preview < log.index("result succeeded"), log
    assert status_of_panel(page) == "succeeded"
    # The API names the file under its public_url, the proxy's origin: the page fetched
    # the same path from its own origin instead, never sending the token elsewhere.
    source = page.evaluate("document.querySelector('#output img.result').dataset.source")
    assert source.startswith(f"{proxy.public_url}/v1/files/")
    assert page.evaluate("document.querySelector('[data-field=cache]').textContent")
    assert "run" in page.evaluate("document.querySelector('[data-field=timings]').textContent")

    # A long job, cancelled while it runs.
    long_id = submit_image(
        page, f"a storm {uuid.uuid4().hex[:6]}", width=512, height=512, steps=100, partials=0
    )
    assert long_id != job_id
    page.wait_for("document.querySelector('#job-status').textContent === 'running'", 60)
    page.wait_for("!document.querySelector('#cancel').disabled")
    page.click("#cancel")
    page.wait_for("document.querySelector('#job-status').textContent === 'cancelled'", 60)
    assert "result cancelled" in job_log(page)
    with api.client() as http:
        assert http.get(f"/v1/jobs/{long_id}").json()["status"] == "cancelled"

    # The gallery: both jobs, re-read from v1/jobs, with their reports.
    page.wait_for("document.querySelectorAll('#gallery .tile').length === 2")
    tile = f"#gallery .tile[data-job={js(job_id)}]"
    assert "cache:" in page.evaluate(f"document.querySelector({js(tile + ' .cache')}).textContent")
    assert "run" in page.evaluate(f"document.querySelector({js(tile + ' .timings')}).textContent")
    assert (
        page.evaluate(
            f"document.querySelector('#gallery .tile[data-job={js(long_id)}] .badge').textContent"
        )
        == "cancelled"
    )
    page.wait_for(f"document.querySelector({js(tile + ' .thumb img')})?.naturalWidth === 64")
    # A tile opens its job again in the panel.
    page.click(tile)
    assert final_image_width(page) == 64
    if SCREENSHOTS:
        page.evaluate("document.activeElement.blur()")
        page.screenshot(DOCS / "playground.png")

    # Operations: the cluster from v1/status, with the configured links.
    page.click("#tab-operations")
    page.wait_for("document.querySelector('#ops-workers').textContent.includes('tiny-flux')", 15)
    pools = page.evaluate("document.querySelector('#ops-pools').textContent")
    assert "diffusion" in pools and "speech" in pools
    assert "DiT cache" in page.evaluate("document.querySelector('#ops-caches').textContent")
    assert page.evaluate("document.querySelector('#ops-health .badge').textContent") in (
        "healthy",
        "unhealthy",
    )
    links = page.evaluate("[...document.querySelectorAll('#links a')].map(a => a.href)")
    assert links == [f"{FLOWER}/", GRAFANA]
    if SCREENSHOTS:
        page.screenshot(DOCS / "operations.png")
    assert page.errors == []


def test_without_a_valid_token_the_page_shows_a_401_and_nothing_else(
    page: Page, api: ApiServer
) -> None:
    answer = httpx.get(f"{api.url}/")  # the page itself needs no token...
    assert answer.status_code == 200
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert httpx.get(f"{api.url}/v1/status").status_code == 401  # ...its data does

    open_page(page, f"{api.url}/", "not-the-token")
    banner = page.wait_for(
        "(b => !b.hidden && b.textContent)(document.querySelector('#banner'))", 15
    )
    assert "401" in banner and "refused" in banner
    assert page.evaluate("document.querySelector('#main').hidden")
    assert page.evaluate("document.querySelector('#token-dialog').open")  # asked again
    assert models_listed(page) == []
    assert page.evaluate("document.querySelector('#ops-workers').textContent") == ""
    assert page.evaluate("sessionStorage.getItem('omni.token')") is None  # not kept
    # Escape: on without a token, which this API refuses too.
    page.press("Escape", 27)
    page.wait_for("document.querySelector('#banner').textContent.includes('needs a bearer')", 15)
    assert page.evaluate("document.querySelector('#main').hidden")
    # The only errors: the browser's own lines for the refused calls.
    assert page.errors and all(e.source == "network" and "401" in e.text for e in page.errors), (
        page.errors
    )
    # The right token, from the dialog again: the page shows the cluster.
    page.wait_for("document.querySelector('#token-dialog').open")
    page.type("#token-input", TOKEN)
    page.click("#token-submit")
    page.wait_for(
        "!document.querySelector('#main').hidden && document.querySelector('#banner').hidden"
    )
    assert "tiny-flux" in models_listed(page)


def test_the_page_works_under_a_path_prefix(page: Page, api: ApiServer, proxy: PrefixProxy) -> None:
    open_page(page, f"{proxy.public_url}/", TOKEN)
    page.wait_for("document.querySelectorAll('#f-model option').length > 1")
    job_id = submit_image(
        page, f"a harbour {uuid.uuid4().hex[:6]}", width=64, height=48, steps=4, partials=1
    )
    assert final_image_width(page) == 64
    assert page.evaluate("document.querySelectorAll('#previews img').length") >= 1
    # The file's URL is the API's, under its public_url: the same origin as the page.
    source = page.evaluate("document.querySelector('#output img.result').dataset.source")
    assert source.startswith(f"{proxy.public_url}/v1/files/")
    asked = set(proxy.paths)
    expected = ["/omni/", "/omni/ui/app.js", "/omni/v1/models", "/omni/v1/jobs"]
    assert set(expected) <= asked, sorted(asked)
    assert f"/omni/v1/jobs/{job_id}/events" in asked
    assert source.removeprefix(proxy.public_url.removesuffix("/omni")) in asked
    assert page.errors == []


def test_an_edit_sends_its_input_image(page: Page, api: ApiServer) -> None:
    """An image edit: the file chosen in the form travels in the job (a data: URL) and
    the edited image comes back at the size asked for."""
    picture = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 60, 30)).save(picture, format="PNG")
    encoded = base64.b64encode(picture.getvalue()).decode("ascii")
    open_page(page, f"{api.url}/", TOKEN)
    page.wait_for("document.querySelectorAll('#f-model option').length > 1")
    page.choose("#f-type", "image")
    assert not page.evaluate("document.querySelector('#f-image').closest('label').hidden")
    page.evaluate(
        "(b => { const bytes = Uint8Array.from(atob(b), c => c.charCodeAt(0));"
        " const files = new DataTransfer();"
        " files.items.add(new File([bytes], 'in.png', {type: 'image/png'}));"
        f" document.querySelector('#f-image').files = files.files; }})({js(encoded)})"
    )
    page.type("#f-prompt", f"the same, in blue {uuid.uuid4().hex[:6]}")
    for name, value in {"width": 64, "height": 64, "steps": 4, "partials": 0}.items():
        page.type(f"#f-{name}", str(value))
    page.click("#submit")
    assert final_image_width(page) == 64
    assert page.wait_for("document.querySelector('#job-status').textContent") == "succeeded"
    assert page.errors == []

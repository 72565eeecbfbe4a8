"""A minimal Chrome DevTools Protocol client for the browser tests: a headless Chromium
started as a user would, one websocket per page, commands answered by id, and the
page's errors (console errors, uncaught exceptions, failed loads and CSP violations)
collected as they come."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect


def find_chromium() -> str | None:
    """The Chromium binary (the Debian package's), or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


class CdpError(RuntimeError):
    pass


@dataclass
class PageError:
    """One error the page reported: where it came from and its text."""

    source: str
    text: str


class Browser:
    """A headless Chromium with its DevTools endpoint on a free port."""

    def __init__(self, binary: str, width: int = 1360, height: int = 900) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="omni-chromium-"))
        args = [
            binary,
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile}",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.port = self._devtools_port()

    def _devtools_port(self, timeout_s: float = 30) -> int:
        """Chromium writes the port it chose to DevToolsActivePort in the profile."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CdpError(f"chromium exited with {self.proc.returncode}")
            lines = marker.read_text().splitlines() if marker.exists() else []
            if lines and lines[0].isdigit():
                return int(lines[0])
            time.sleep(0.05)
        raise CdpError("chromium did not open its DevTools port")

    def new_page(self) -> Page:
        """A new tab (its own sessionStorage), with its errors collected."""
        target = httpx.put(f"http://127.0.0.1:{self.port}/json/new?about:blank").json()
        page = Page(target["webSocketDebuggerUrl"], target["id"], self)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send("Log.enable")
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: its helpers too
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab: `send` a command and get its result; events are read by a thread."""

    def __init__(self, ws_url: str, target_id: str, browser: Browser) -> None:
        self.target_id = target_id
        self.browser = browser
        # Entered by hand (closed in close()): websockets 17.1 warns when a connection is
        # used outside a `with`, and `legacy=True` does not exist before it.
        self.ws: ClientConnection = connect(ws_url, max_size=None, open_timeout=10).__enter__()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._answers: dict[int, dict[str, Any]] = {}
        self._answered = threading.Condition(self._lock)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.errors: list[PageError] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                message = json.loads(raw)
                with self._lock:
                    if "id" in message:
                        self._answers[message["id"]] = message
                        self._answered.notify_all()
                    else:
                        self.events.append((message["method"], message.get("params", {})))
                        self._collect(message["method"], message.get("params", {}))
        except Exception:  # the connection closed: waiting senders time out
            pass

    def _collect(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.errors.append(PageError("console", text))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.errors.append(PageError("exception", text))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            text = f"{entry['text']} {entry.get('url', '')}"
            self.errors.append(PageError(entry["source"], text))

    def send(self, method: str, timeout_s: float = 30, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while message_id not in self._answers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CdpError(f"{method}: no answer in {timeout_s} s")
                self._answered.wait(remaining)
            answer = self._answers.pop(message_id)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def navigate(self, url: str, timeout_s: float = 30) -> None:
        """Load `url` and wait for its load event."""
        with self._lock:
            seen = len(self.events)
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if any(m == "Page.loadEventFired" for m, _ in self.events[seen:]):
                    return
            time.sleep(0.02)
        raise CdpError(f"{url} did not load in {timeout_s} s")

    def evaluate(self, expression: str, timeout_s: float = 30) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise)."""
        result = self.send(
            "Runtime.evaluate",
            timeout_s=timeout_s,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"{expression!r} threw {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30, interval_s: float = 0.05) -> Any:
        """The first truthy value of `expression`, polled; AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval_s)
        raise AssertionError(
            f"{expression!r} still {value!r} after {timeout_s} s; page errors: {self.errors}"
        )

    def click(self, selector: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def type(self, selector: str, text: str) -> None:
        """Replace the value of an input as a user's typing does (input events)."""
        found = f"document.querySelector({json.dumps(selector)})"
        self.evaluate(f"(e => {{ e.focus(); e.value = ''; }})({found})")
        self.send("Input.insertText", text=text)

    def choose(self, selector: str, value: str) -> None:
        """Pick an option of a <select>, with the change event a user's pick fires."""
        self.evaluate(
            f"(e => {{ e.value = {json.dumps(value)}; "
            "e.dispatchEvent(new Event('change', {bubbles: true})); })"
            f"(document.querySelector({json.dumps(selector)}))"
        )

    def press(self, key: str, code: int) -> None:
        """A key pressed and released, as the keyboard sends it ("Escape", 27)."""
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code
            )

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        try:
            httpx.get(f"http://127.0.0.1:{self.browser.port}/json/close/{self.target_id}")
        finally:
            self.ws.close()

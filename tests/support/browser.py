"""Headless chromium over the Chrome DevTools Protocol, for the browser tests of /docs and
/ui (tests/service/test_*_browser.py): Debian's chromium, the `websockets` package, nothing
downloaded."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.live_server import stop_process

FIXTURE_XRAY = (
    Path(__file__).resolve().parents[1] / "fixtures" / "fullres" / "NORMAL_IM-0206-0001.jpeg"
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
# Schemes that never touch the network.
LOCAL_SCHEMES = {"data", "blob", "about", "chrome", "devtools"}


def _find_chromium() -> str | None:
    candidates = [
        os.environ.get("CHROMIUM", ""),
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    for name in candidates:
        if name and (path := shutil.which(name)):
            return path
    return None


CHROMIUM = _find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
)


class CDPError(RuntimeError):
    pass


class CDP:
    """A minimal synchronous Chrome DevTools Protocol client for one page target."""

    def __init__(self, websocket_url: str) -> None:
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(connect(websocket_url, max_size=None, open_timeout=10))
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self._stack.close()

    def send(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"{method}: no answer in {timeout} s")
            message = json.loads(self._ws.recv(timeout=remaining))
            if message.get("id") == message_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CDPError(f"JS error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise CDPError(f"timed out waiting for {what or expression}")


@contextlib.contextmanager
def headless_chromium() -> Iterator[CDP]:
    assert CHROMIUM is not None
    profile = Path(tempfile.mkdtemp(prefix="pneumoscreen-chromium-"))
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--metrics-recording-only",
        "--mute-audio",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
        # Belt and braces: even if the page tried, no name but localhost resolves.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if process.poll() is not None:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise CDPError(f"chromium exited with {process.returncode}: {stderr[-2000:]}")
            if time.monotonic() > deadline:
                raise CDPError("chromium did not write DevToolsActivePort in 30 s")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        targets = []
        while time.monotonic() < deadline and not targets:
            listing = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            targets = [t for t in listing if t.get("type") == "page"]
            if not targets:
                time.sleep(0.05)
        if not targets:
            raise CDPError("chromium has no page target")
        cdp = CDP(targets[0]["webSocketDebuggerUrl"])
        yield cdp
    finally:
        if cdp is not None:
            with contextlib.suppress(Exception):
                cdp.close()
        stop_process(process)
        if process.stderr:
            process.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)


def non_local_requests(events: list[dict[str, Any]]) -> list[str]:
    leaks = []
    for event in events:
        if event["method"] != "Network.requestWillBeSent":
            continue
        url = event["params"]["request"]["url"]
        parts = urlsplit(url)
        if parts.scheme in LOCAL_SCHEMES:
            continue
        if parts.hostname not in LOCAL_HOSTS:
            leaks.append(url)
    return leaks


# JS helpers: the POST /predict operation block of Swagger UI 4.
PREDICT_OPBLOCK = """(() => {
  const blocks = [...document.querySelectorAll('.opblock.opblock-post')];
  return blocks.find(b => {
    const path = b.querySelector('.opblock-summary-path');
    return path && (path.getAttribute('data-path') || path.textContent).trim() === '/predict';
  }) || null;
})()"""

PREDICT = "[data-test=predict]"  # the POST /predict block, once `open_predict` marked it


def open_docs(cdp: CDP, url: str) -> list[str]:
    """Load Swagger UI at `url` and wait for it to render the operations of the service's
    OpenAPI document; they are returned as "METHOD /path"."""
    cdp.send("Page.enable")
    cdp.send("Runtime.enable")
    cdp.send("Page.navigate", url=url)
    cdp.wait_for(
        "document.querySelectorAll('.swagger-ui .opblock').length > 0",
        what="swagger-ui operations",
    )
    operations: list[str] = cdp.evaluate(
        "[...document.querySelectorAll('.opblock')].map(b => "
        "b.querySelector('.opblock-summary-method').textContent.trim() + ' ' + "
        "(b.querySelector('.opblock-summary-path').getAttribute('data-path') || "
        "b.querySelector('.opblock-summary-path').textContent).trim())"
    )
    return operations


def open_predict(cdp: CDP) -> None:
    """Mark Swagger UI's POST /predict block as PREDICT and expand it."""
    cdp.evaluate(f"{PREDICT_OPBLOCK}.setAttribute('data-test', 'predict')")
    cdp.evaluate(
        f"(() => {{ const b = document.querySelector('{PREDICT}');"
        " (b.querySelector('.opblock-summary-control') || b.querySelector('.opblock-summary'))"
        ".click(); })()"
    )
    cdp.wait_for(
        f"document.querySelector('{PREDICT} .opblock-body') !== null",
        what="the expanded POST /predict",
    )


def try_it_out(cdp: CDP) -> None:
    """Switch POST /predict to "Try it out" (unless it is on) and wait for its file input."""
    button = f"document.querySelector('{PREDICT} .try-out__btn')"
    cdp.wait_for(f"{button} !== null", what="the Try it out button")
    if cdp.evaluate(f"{button}.textContent.trim()") == "Try it out":
        cdp.evaluate(f"{button}.click()")
    cdp.wait_for(
        f"document.querySelector('{PREDICT} input[type=file]') !== null", what="the file input"
    )


def attach_file(cdp: CDP, path: Path) -> None:
    """Put `path` in POST /predict's file input, as a user picking it would (DOM domain)."""
    document = cdp.send("DOM.getDocument", depth=-1)
    node = cdp.send(
        "DOM.querySelector",
        nodeId=document["root"]["nodeId"],
        selector=f"{PREDICT} input[type=file]",
    )
    assert node["nodeId"], "file input found through the DOM domain"
    cdp.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(path)])


def execute_predict(cdp: CDP) -> str:
    """Click Execute on POST /predict; the response body as the page shows it."""
    execute = f"document.querySelector('{PREDICT} .btn.execute')"
    cdp.wait_for(f"{execute} !== null", what="the Execute button")
    cdp.evaluate(f"{execute}.click()")
    body: str = cdp.wait_for(
        "(() => { const el = document.querySelector("
        f"'{PREDICT} .live-responses-table .response-col_description pre');"
        " return el ? el.textContent : null; })()",
        what="the response body shown in the page",
    )
    return body

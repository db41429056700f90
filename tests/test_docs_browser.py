"""/docs in a real headless browser (Debian's chromium), driven over the Chrome DevTools
Protocol with the `websockets` package: nothing is downloaded.

It checks that the Swagger UI page renders from the service alone (no request leaves
localhost: hospital networks are often offline) and that a radiograph can be uploaded
through the page with "Try it out" / "Execute" and comes back as a JSON prediction.
"""

from __future__ import annotations

import base64
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
from live_server import LiveServer, stop_process

pytestmark = pytest.mark.browser

FIXTURE_XRAY = Path(__file__).resolve().parent / "fixtures" / "fullres" / "NORMAL_IM-0206-0001.jpeg"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
# Schemes that never touch the network.
LOCAL_SCHEMES = {"data", "blob", "about", "chrome", "devtools"}


def _find_chromium() -> str | None:
    candidates = [os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser",
                  "google-chrome", "google-chrome-stable"]
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
        self._ws = self._stack.enter_context(
            connect(websocket_url, max_size=None, open_timeout=10)
        )
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
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
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
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
        "--disable-dev-shm-usage", "--window-size=1280,1600",
        # Belt and braces: even if the page tried, no name but localhost resolves.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
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


def _non_local_requests(events: list[dict[str, Any]]) -> list[str]:
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
_OPBLOCK = """(() => {
  const blocks = [...document.querySelectorAll('.opblock.opblock-post')];
  return blocks.find(b => {
    const path = b.querySelector('.opblock-summary-path');
    return path && (path.getAttribute('data-path') || path.textContent).trim() === '/predict';
  }) || null;
})()"""


@needs_chromium
def test_docs_render_offline_and_upload_an_xray(server: LiveServer, tmp_path: Path) -> None:
    started = time.monotonic()
    with headless_chromium() as cdp:
        cdp.send("Network.enable")
        cdp.send("Page.enable")
        cdp.send("Runtime.enable")
        cdp.send("Page.navigate", url=server.url("/docs"))

        # Swagger UI rendered the operations from the service's own OpenAPI document.
        cdp.wait_for("document.querySelectorAll('.swagger-ui .opblock').length > 0",
                     what="swagger-ui operations")
        operations = cdp.evaluate(
            "[...document.querySelectorAll('.opblock')].map(b => "
            "b.querySelector('.opblock-summary-method').textContent.trim() + ' ' + "
            "(b.querySelector('.opblock-summary-path').getAttribute('data-path') || "
            "b.querySelector('.opblock-summary-path').textContent).trim())"
        )
        assert "POST /predict" in operations, operations
        assert "POST /predict/batch" in operations, operations
        assert "GET /health" in operations, operations
        title = cdp.evaluate("document.querySelector('.swagger-ui .info .title').textContent")
        assert title, "the API title is shown"

        # Expand POST /predict, switch on "Try it out" (unless already on), attach a file.
        cdp.evaluate(f"{_OPBLOCK}.setAttribute('data-test', 'predict')")
        cdp.evaluate(
            "(() => { const b = document.querySelector('[data-test=predict]');"
            " (b.querySelector('.opblock-summary-control') || b.querySelector('.opblock-summary'))"
            ".click(); })()"
        )
        cdp.wait_for("document.querySelector('[data-test=predict] .opblock-body') !== null",
                     what="the expanded POST /predict")
        cdp.wait_for("document.querySelector('[data-test=predict] .try-out__btn') !== null",
                     what="the Try it out button")
        if cdp.evaluate("document.querySelector('[data-test=predict] .try-out__btn')"
                        ".textContent.trim()") == "Try it out":
            cdp.evaluate("document.querySelector('[data-test=predict] .try-out__btn').click()")
        cdp.wait_for("document.querySelector('[data-test=predict] input[type=file]') !== null",
                     what="the file input")

        document = cdp.send("DOM.getDocument", depth=-1)
        node = cdp.send("DOM.querySelector", nodeId=document["root"]["nodeId"],
                        selector="[data-test=predict] input[type=file]")
        assert node["nodeId"], "file input found through the DOM domain"
        cdp.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(FIXTURE_XRAY)])
        assert cdp.evaluate(
            "document.querySelector('[data-test=predict] input[type=file]').files[0].name"
        ) == FIXTURE_XRAY.name

        cdp.wait_for("document.querySelector('[data-test=predict] .btn.execute') !== null",
                     what="the Execute button")
        cdp.evaluate("document.querySelector('[data-test=predict] .btn.execute').click()")

        # The live response appears in the page: status 200 and a JSON body with a label.
        body_js = ("(() => { const el = document.querySelector("
                   "'[data-test=predict] .live-responses-table .response-col_description pre');"
                   " return el ? el.textContent : null; })()")
        text = cdp.wait_for(body_js, what="the response body shown in the page")
        status = cdp.evaluate(
            "document.querySelector('[data-test=predict] .live-responses-table "
            ".response .response-col_status').textContent.trim()"
        )
        assert status.startswith("200"), (status, text)
        prediction = json.loads(text)
        assert prediction["label"] in {"NORMAL", "PNEUMONIA"}, prediction
        assert set(prediction["probabilities"]) == {"NORMAL", "PNEUMONIA"}

        # Let late requests (fonts, images) show up before looking at the network log.
        time.sleep(0.3)
        cdp.send("Runtime.evaluate", expression="1")
        screenshot = cdp.send("Page.captureScreenshot", format="png",
                              captureBeyondViewport=False)
        shot = tmp_path / "docs.png"
        shot.write_bytes(base64.b64decode(screenshot["data"]))
        if target := os.environ.get("DOCS_SCREENSHOT"):
            Path(target).write_bytes(shot.read_bytes())
        assert shot.stat().st_size > 10_000, "a rendered page, not a blank one"

        requested = [e["params"]["request"]["url"] for e in cdp.events
                     if e["method"] == "Network.requestWillBeSent"]
        assert any(url.endswith("/openapi.json") for url in requested), requested
        assert any("swagger-ui-bundle.js" in url for url in requested), requested
        # (Swagger UI adds the query parameters it shows, e.g. ?explain=false.)
        assert any(urlsplit(url).path.endswith("/predict") for url in requested), requested
        leaks = _non_local_requests(cdp.events)
        assert not leaks, f"/docs made requests beyond localhost: {leaks}"
        failed = [e["params"].get("errorText") for e in cdp.events
                  if e["method"] == "Network.loadingFailed"]
        assert not failed, f"requests failed while loading /docs: {failed}"
    assert time.monotonic() - started < 60

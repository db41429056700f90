"""/docs in a real headless browser (Debian's chromium), driven over the Chrome DevTools
Protocol with the `websockets` package: nothing is downloaded.

It checks that the Swagger UI page renders from the service alone (no request leaves
localhost: hospital networks are often offline) and that a radiograph can be uploaded
through the page with "Try it out" / "Execute" and comes back as a JSON prediction.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.browser import (
    FIXTURE_XRAY,
    PREDICT,
    attach_file,
    execute_predict,
    headless_chromium,
    needs_chromium,
    non_local_requests,
    open_docs,
    open_predict,
    try_it_out,
)
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.browser


@needs_chromium
def test_docs_render_offline_and_upload_an_xray(server: LiveServer, tmp_path: Path) -> None:
    started = time.monotonic()
    with headless_chromium() as cdp:
        cdp.send("Network.enable")  # every request the page makes, for the offline check
        # Swagger UI rendered the operations from the service's own OpenAPI document.
        operations = open_docs(cdp, server.url("/docs"))
        assert "POST /predict" in operations, operations
        assert "POST /predict/batch" in operations, operations
        assert "GET /health" in operations, operations
        title = cdp.evaluate("document.querySelector('.swagger-ui .info .title').textContent")
        assert title, "the API title is shown"

        # Expand POST /predict, switch on "Try it out" (unless already on), attach a file.
        open_predict(cdp)
        try_it_out(cdp)
        attach_file(cdp, FIXTURE_XRAY)
        assert (
            cdp.evaluate(f"document.querySelector('{PREDICT} input[type=file]').files[0].name")
            == FIXTURE_XRAY.name
        )

        # The live response appears in the page: status 200 and a JSON body with a label.
        text = execute_predict(cdp)
        status = cdp.evaluate(
            f"document.querySelector('{PREDICT} .live-responses-table "
            ".response .response-col_status').textContent.trim()"
        )
        assert status.startswith("200"), (status, text)
        prediction = json.loads(text)
        assert prediction["label"] in {"NORMAL", "PNEUMONIA"}, prediction
        assert set(prediction["probabilities"]) == {"NORMAL", "PNEUMONIA"}

        # Let late requests (fonts, images) show up before looking at the network log.
        time.sleep(0.3)
        cdp.send("Runtime.evaluate", expression="1")
        screenshot = cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        shot = tmp_path / "docs.png"
        shot.write_bytes(base64.b64decode(screenshot["data"]))
        if target := os.environ.get("DOCS_SCREENSHOT"):
            Path(target).write_bytes(shot.read_bytes())
        assert shot.stat().st_size > 10_000, "a rendered page, not a blank one"

        requested = [
            e["params"]["request"]["url"]
            for e in cdp.events
            if e["method"] == "Network.requestWillBeSent"
        ]
        assert any(url.endswith("/openapi.json") for url in requested), requested
        assert any("swagger-ui-bundle.js" in url for url in requested), requested
        # (Swagger UI adds the query parameters it shows, e.g. ?explain=false.)
        assert any(urlsplit(url).path.endswith("/predict") for url in requested), requested
        leaks = non_local_requests(cdp.events)
        assert not leaks, f"/docs made requests beyond localhost: {leaks}"
        failed = [
            e["params"].get("errorText")
            for e in cdp.events
            if e["method"] == "Network.loadingFailed"
        ]
        assert not failed, f"requests failed while loading /docs: {failed}"
    assert time.monotonic() - started < 60

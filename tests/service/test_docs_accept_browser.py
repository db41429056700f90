"""/docs in headless chromium shows the Accept variants of POST /predict, and "Try it out"
with one picked really gets that media type back (Swagger UI sends it as Accept)."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from tests.support.browser import (
    FIXTURE_XRAY,
    PREDICT,
    attach_file,
    execute_predict,
    headless_chromium,
    needs_chromium,
    open_docs,
    open_predict,
    try_it_out,
)
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.browser

MEDIA_SELECT = f"{PREDICT} .responses-wrapper select"


@needs_chromium
def test_docs_offer_and_send_the_accept_variants(server: LiveServer, tmp_path: Path) -> None:
    with headless_chromium() as cdp:
        operations = open_docs(cdp, server.url("/docs"))
        assert "POST /v2/models/{name}/infer" in operations, operations

        open_predict(cdp)
        cdp.wait_for(
            f"document.querySelector('{MEDIA_SELECT}') !== null",
            what="the response media type list",
        )
        options = cdp.evaluate(
            f"[...document.querySelector('{MEDIA_SELECT}').options].map(o => o.value)"
        )
        assert set(options) == {"application/json", "application/dicom", "application/fhir+json"}, (
            options
        )

        # Try it out with the FHIR media type picked: the answer is a FHIR Bundle.
        try_it_out(cdp)
        cdp.evaluate(
            "(() => { const s = document.querySelector('" + MEDIA_SELECT + "');"
            " const set = Object.getOwnPropertyDescriptor(HTMLSelectElement.prototype,"
            " 'value').set; set.call(s, 'application/fhir+json');"
            " s.dispatchEvent(new Event('change', {bubbles: true})); })()"
        )
        attach_file(cdp, FIXTURE_XRAY)
        text = execute_predict(cdp)
        curl = cdp.evaluate(f"document.querySelector('{PREDICT} .curl').textContent")
        assert "accept: application/fhir+json" in curl.lower(), curl
        assert json.loads(text)["resourceType"] == "Bundle", text[:300]

        time.sleep(0.3)
        cdp.evaluate(f"document.querySelector('{MEDIA_SELECT}').scrollIntoView()")
        shot = cdp.send("Page.captureScreenshot", format="png")
        (tmp_path / "accept.png").write_bytes(base64.b64decode(shot["data"]))
        if target := os.environ.get("DOCS_ACCEPT_SCREENSHOT"):
            Path(target).write_bytes((tmp_path / "accept.png").read_bytes())

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
    PREDICT_OPBLOCK,
    headless_chromium,
    needs_chromium,
)
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.browser

MEDIA_SELECT = "[data-test=predict] .responses-wrapper select"


@needs_chromium
def test_docs_offer_and_send_the_accept_variants(server: LiveServer, tmp_path: Path) -> None:
    with headless_chromium() as cdp:
        cdp.send("Page.enable")
        cdp.send("Runtime.enable")
        cdp.send("Page.navigate", url=server.url("/docs"))
        cdp.wait_for(
            "document.querySelectorAll('.swagger-ui .opblock').length > 0",
            what="swagger-ui operations",
        )
        operations = cdp.evaluate(
            "[...document.querySelectorAll('.opblock-summary-path')].map(p => "
            "(p.getAttribute('data-path') || p.textContent).trim())"
        )
        assert "/v2/models/{name}/infer" in operations, operations

        cdp.evaluate(f"{PREDICT_OPBLOCK}.setAttribute('data-test', 'predict')")
        cdp.evaluate(
            "(() => { const b = document.querySelector('[data-test=predict]');"
            " (b.querySelector('.opblock-summary-control') || "
            "b.querySelector('.opblock-summary')).click(); })()"
        )
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
        if (
            cdp.evaluate(
                "document.querySelector('[data-test=predict] .try-out__btn').textContent.trim()"
            )
            == "Try it out"
        ):
            cdp.evaluate("document.querySelector('[data-test=predict] .try-out__btn').click()")
        cdp.wait_for(
            "document.querySelector('[data-test=predict] input[type=file]') !== null",
            what="the file input",
        )
        cdp.evaluate(
            "(() => { const s = document.querySelector('" + MEDIA_SELECT + "');"
            " const set = Object.getOwnPropertyDescriptor(HTMLSelectElement.prototype,"
            " 'value').set; set.call(s, 'application/fhir+json');"
            " s.dispatchEvent(new Event('change', {bubbles: true})); })()"
        )
        document = cdp.send("DOM.getDocument", depth=-1)
        node = cdp.send(
            "DOM.querySelector",
            nodeId=document["root"]["nodeId"],
            selector="[data-test=predict] input[type=file]",
        )
        cdp.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(FIXTURE_XRAY)])
        cdp.evaluate("document.querySelector('[data-test=predict] .btn.execute').click()")
        body_js = (
            "(() => { const el = document.querySelector("
            "'[data-test=predict] .live-responses-table .response-col_description pre');"
            " return el ? el.textContent : null; })()"
        )
        text = cdp.wait_for(body_js, what="the response body shown in the page")
        curl = cdp.evaluate("document.querySelector('[data-test=predict] .curl').textContent")
        assert "accept: application/fhir+json" in curl.lower(), curl
        assert json.loads(text)["resourceType"] == "Bundle", text[:300]

        time.sleep(0.3)
        cdp.evaluate(f"document.querySelector('{MEDIA_SELECT}').scrollIntoView()")
        shot = cdp.send("Page.captureScreenshot", format="png")
        (tmp_path / "accept.png").write_bytes(base64.b64decode(shot["data"]))
        if target := os.environ.get("DOCS_ACCEPT_SCREENSHOT"):
            Path(target).write_bytes((tmp_path / "accept.png").read_bytes())

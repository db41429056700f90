"""/ui in headless chromium (Debian's), over the Chrome DevTools Protocol.

A fixture X-ray picked through the page's file input comes back scored, with the heatmap
drawn over the image (checked on the screenshot's pixels: coloured overlay over a grey
radiograph); a DICOM file is shown through the server's preview; a generated non-X-ray
shows the refusal reason; nothing is requested beyond localhost.
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.gate_eval import generated_images
from tests.support.browser import CDP, headless_chromium, needs_chromium, non_local_requests
from tests.support.dicom_factory import write_dicom
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.browser

FIXTURE_XRAY = (
    Path(__file__).resolve().parents[1] / "fixtures" / "fullres" / "NORMAL_IM-0206-0001.jpeg"
)


def _pick(cdp: CDP, path: Path) -> None:
    cdp.evaluate("document.body.dataset.outcome = ''")
    document = cdp.send("DOM.getDocument", depth=-1)
    node = cdp.send("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")
    cdp.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(path)])
    cdp.wait_for("document.body.dataset.outcome", what=f"the answer for {path.name}")


def _screenshot(cdp: CDP) -> Image.Image:
    shot = cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
    return Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")


def _stage_box(cdp: CDP) -> tuple[int, int, int, int]:
    box = cdp.evaluate(
        "(() => { const r = document.getElementById('stage')"
        ".getBoundingClientRect(); const d = window.devicePixelRatio;"
        " return [r.left * d, r.top * d, r.right * d, r.bottom * d]; })()"
    )
    return tuple(round(v) for v in box)  # type: ignore[return-value]


def _chroma(region: Image.Image) -> np.ndarray:
    pixels = np.asarray(region, dtype=np.int16)
    return pixels.max(axis=-1) - pixels.min(axis=-1)


@needs_chromium
def test_ui_scores_an_xray_with_its_heatmap_and_shows_refusals(
    gated_server: LiveServer, tmp_path: Path
) -> None:
    page = tmp_path / "request-form.png"
    page.write_bytes(dict(generated_images())["text page 0"])
    dicom = write_dicom(tmp_path / "chest.dcm", np.asarray(Image.open(FIXTURE_XRAY).convert("L")))
    started = time.monotonic()
    with headless_chromium() as cdp:
        cdp.send("Network.enable")
        cdp.send("Page.enable")
        cdp.send("Runtime.enable")
        cdp.send(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=1400,
            deviceScaleFactor=1,
            mobile=False,
        )
        cdp.send("Page.navigate", url=gated_server.url("/ui"))
        cdp.wait_for("document.body && document.body.dataset.ready === '1'", what="/model read")
        assert "heatmaps available" in cdp.evaluate("document.getElementById('model').textContent")

        # An X-ray: label, probability against the threshold, heatmap over the image.
        _pick(cdp, FIXTURE_XRAY)
        assert cdp.evaluate("document.body.dataset.outcome") == "scored"
        label = cdp.evaluate("document.getElementById('label').textContent")
        assert label.split()[0] in {"NORMAL", "PNEUMONIA"}, label
        assert "Threshold" in cdp.evaluate("document.getElementById('threshold').textContent")
        cdp.wait_for(
            "document.getElementById('heatmap').complete && "
            "document.getElementById('heatmap').naturalWidth > 0 && "
            "document.getElementById('image').naturalWidth > 0",
            what="images loaded",
        )
        with Image.open(FIXTURE_XRAY) as image:  # .size alone leaves the file open
            original = image.size
        assert cdp.evaluate("document.getElementById('heatmap').naturalWidth") == original[0]

        box = _stage_box(cdp)
        cdp.evaluate(
            "(() => { const s = document.getElementById('opacity'); s.value = 0;"
            " s.dispatchEvent(new Event('input')); })()"
        )
        bare = _screenshot(cdp).crop(box)
        cdp.evaluate(
            "(() => { const s = document.getElementById('opacity'); s.value = 100;"
            " s.dispatchEvent(new Event('input')); })()"
        )
        time.sleep(0.2)
        shot = _screenshot(cdp)
        if target := os.environ.get("UI_SCREENSHOT"):
            shot.save(target)
        overlay = shot.crop(box)
        assert overlay.size[0] > 300 and overlay.size[1] > 300
        # Without the heatmap the radiograph is grey; with it, part of it is coloured.
        assert np.mean(_chroma(bare) > 40) < 0.01
        coloured = np.mean(_chroma(overlay) > 40)
        assert coloured > 0.05, f"overlay not visible: {coloured:.3f} of the area coloured"
        assert np.asarray(overlay.convert("L")).std() > 20, "not a blank image"

        # DICOM: the browser cannot decode it; the page shows the server's preview.
        _pick(cdp, dicom)
        assert cdp.evaluate("document.body.dataset.outcome") == "scored"
        cdp.wait_for("document.getElementById('image').naturalWidth > 0", what="DICOM preview")
        assert cdp.evaluate("document.getElementById('image').src.startsWith('data:image/png')")

        # Not an X-ray: the refusal and its reason.
        _pick(cdp, page)
        assert cdp.evaluate("document.body.dataset.outcome") == "refused"
        assert (
            cdp.evaluate("document.getElementById('refusal-code').textContent") == "not_chest_xray"
        )
        assert cdp.evaluate("document.getElementById('refusal-message').textContent")
        assert cdp.evaluate("getComputedStyle(document.getElementById('result')).display") == "none"

        leaks = non_local_requests(cdp.events)
        assert not leaks, f"/ui made requests beyond localhost: {leaks}"
    assert time.monotonic() - started < 90

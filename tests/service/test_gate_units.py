"""The gate, the heatmap and the format 2 bundle, in process."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.bundle import GATE_FILE, META_FILE, BundleError, GateInfo, read_bundle
from service.gate import (
    GateRefusal,
    GateStats,
    check_dicom_tags,
    check_pixels,
    decide,
)
from service.heatmap import LEVELS, heatmap_levels, heatmap_payload, normalise_cam
from service.image_facts import DicomTags, ImageFacts, read_facts
from tests.support.bundle_factory import (
    fixture_inputs,
    make_tiny_bundle,
    make_tiny_explain_onnx,
    make_tiny_gated_bundle,
)
from tests.support.xray_samples import FULLRES


def _info(threshold: float = 3.0, rotated: float = 3.0) -> GateInfo:
    return GateInfo(
        method="test",
        classes=["NORMAL", "PNEUMONIA", "ROTATED_90"],
        threshold=threshold,
        rotated_threshold=rotated,
        target_acceptance=0.995,
        feature_dim=2,
        components=2,
    )


def test_mahalanobis_distances_match_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    covariance = a @ a.T + np.eye(4)
    precision = np.linalg.inv(covariance)
    means = rng.normal(size=(3, 4))
    center = rng.normal(size=6)
    basis = np.linalg.qr(rng.normal(size=(6, 4)))[0]
    stats = GateStats(("NORMAL", "PNEUMONIA", "ROTATED_90"), center, basis, means, precision)
    x = rng.normal(size=(5, 6))
    z = (x - center) @ basis
    expected = np.array([[np.sqrt((zi - m) @ precision @ (zi - m)) for m in means] for zi in z])
    np.testing.assert_allclose(stats.distances(x), expected, rtol=1e-12)
    assert stats.upright.tolist() == [True, True, False]


def test_decision_rules() -> None:
    stats = GateStats(
        ("NORMAL", "PNEUMONIA", "ROTATED_90"), np.zeros(2), np.eye(2), np.zeros((3, 2)), np.eye(2)
    )
    info = _info()
    assert decide(stats, info, np.array([1.0, 2.0, 4.0])).accepted
    far = decide(stats, info, np.array([5.0, 6.0, 7.0]))
    assert not far.accepted and far.refusal is not None
    assert far.refusal.code == "not_chest_xray" and "5.0" in far.refusal.message
    turned = decide(stats, info, np.array([2.5, 2.8, 1.0]))
    assert turned.refusal is not None and turned.refusal.code == "rotated_image"
    assert "90 degrees" in turned.refusal.message
    # Nearest is a rotated class but beyond its own threshold: not an X-ray at all.
    odd = decide(stats, info, np.array([8.0, 9.0, 7.0]))
    assert odd.refusal is not None and odd.refusal.code == "not_chest_xray"


@pytest.mark.parametrize(
    "tags,code",
    [
        (DicomTags("DX", "CHEST", "PA"), None),
        (DicomTags(None, None, None), None),
        (DicomTags("DR", "THORAX", "AP"), None),
        (DicomTags("CT", "CHEST", None), "not_chest_xray"),
        (DicomTags("US", None, None), "not_chest_xray"),
        (DicomTags("CR", "KNEE", "PA"), "not_chest_xray"),
        (DicomTags("CR", "CHEST", "RL"), "unsupported_view"),
        (DicomTags("DX", "CHEST", "LLO"), "unsupported_view"),
    ],
)
def test_dicom_tag_rules(tags: DicomTags, code: str | None) -> None:
    facts = ImageFacts(100, 100, 0.0, "dicom", tags)
    if code is None:
        check_dicom_tags(facts)
    else:
        with pytest.raises(GateRefusal) as caught:
            check_dicom_tags(facts)
        assert caught.value.code == code


def test_pixel_checks() -> None:
    xray = np.repeat(
        np.asarray(Image.open(FULLRES[0]).convert("L").resize((64, 64)))[..., None], 3, axis=2
    )
    check_pixels(ImageFacts(1000, 900, 0.0, "jpeg"), xray)
    for facts, image, word in (
        (ImageFacts(1000, 900, 0.3, "jpeg"), xray, "coloured"),
        (ImageFacts(3100, 1000, 0.0, "jpeg"), xray, "aspect"),
        (ImageFacts(500, 500, 0.0, "png"), np.full((64, 64, 3), 77, np.uint8), "blank"),
    ):
        with pytest.raises(GateRefusal, match=word):
            check_pixels(facts, image)


def test_facts_read_size_colour_and_orientation() -> None:
    facts = read_facts(FULLRES[0].read_bytes())
    with Image.open(FULLRES[0]) as original:  # .size alone leaves the file open
        width, height = original.size
    assert (facts.width, facts.height, facts.colour_share) == (width, height, 0.0)
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: width and height swap when shown upright
    Image.new("RGB", (300, 200), (250, 30, 30)).save(buffer, format="JPEG", exif=exif)
    red = read_facts(buffer.getvalue())
    assert (red.width, red.height) == (200, 300) and red.colour_share > 0.9
    assert read_facts(b"not an image").width is None


def test_heatmap_is_normalised_positive_evidence() -> None:
    cam = np.array([[-3.0, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(normalise_cam(cam), [[0, 0], [0.5, 1.0]])
    assert not normalise_cam(-np.ones((3, 3))).any()
    image = heatmap_levels(cam, 300, 200)
    assert image.size == (300, 200) and image.mode == "P"
    levels = np.asarray(image)
    assert levels.max() == LEVELS - 1 and levels.min() == 0
    payload = heatmap_payload(cam, 1401, 999)
    assert (payload["width"], payload["height"]) == (1401, 999)


def test_tiny_cam_mean_is_the_log_odds(tmp_path: Path) -> None:
    from service.onnx_session import make_session

    make_tiny_explain_onnx(tmp_path / "m.onnx", size=64)
    session = make_session(tmp_path / "m.onnx")
    images = np.random.default_rng(1).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    probabilities, features, cam = session.run(
        ["probabilities", "features", "cam"], {"image": images}
    )
    assert features.shape == (6, 128) and cam.shape == (6, 8, 8)
    log_odds = np.log(probabilities[:, 1]) - np.log(probabilities[:, 0])
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), log_odds, atol=1e-5)


def test_format_2_bundle_round_trip_and_sha256_of_the_gate(tmp_path: Path) -> None:
    meta = make_tiny_gated_bundle(tmp_path)
    read = read_bundle(tmp_path)
    assert read == meta and read.format_version == 2 and read.has_explain_outputs
    assert set(read.files_sha256) == {"model.onnx", GATE_FILE}
    with (tmp_path / GATE_FILE).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(tmp_path)
    (tmp_path / GATE_FILE).unlink()
    with pytest.raises(BundleError, match=r"gate\.npz"):
        read_bundle(tmp_path)


def test_format_2_needs_the_gate_and_outputs(tmp_path: Path) -> None:
    make_tiny_gated_bundle(tmp_path)
    card = json.loads((tmp_path / META_FILE).read_text())
    card["outputs"] = ["probabilities"]
    (tmp_path / META_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="outputs"):
        read_bundle(tmp_path)


def test_format_1_bundles_still_load(tmp_path: Path) -> None:
    meta = make_tiny_bundle(tmp_path)
    read = read_bundle(tmp_path)
    assert read.format_version == 1 and not read.has_explain_outputs and read.gate is None
    assert read == meta and not (tmp_path / GATE_FILE).exists()


def test_the_served_model_brings_the_gate_distances_of_its_batch(tmp_path: Path) -> None:
    """LoadedModel.run adds the gate's distances, one matrix product for the batch; the
    verdicts from them are those computed from each image's features alone."""
    from service.bundle import FEATURES_NAME
    from service.config import Settings
    from service.gate import GATE_DISTANCES
    from service.inference import ModelRunner
    from service.screening import Prepared, judge

    make_tiny_gated_bundle(tmp_path)
    for enabled in (True, False):
        runner = ModelRunner(Settings(model_dir=tmp_path, providers="cpu", gate_enabled=enabled))
        runner.load()
        try:
            model = runner.require_model()
            assert model.gate is not None
            size = model.meta.input.height
            noise = np.random.default_rng(2).integers(0, 256, (3, size, size, 3), np.uint8)
            xrays, _ = fixture_inputs(size, "val")
            images = np.concatenate([xrays, noise])
            outputs = model.run(images)
            if not enabled:
                assert GATE_DISTANCES not in outputs  # a gate switched off costs nothing
                continue
            features = outputs[FEATURES_NAME]
            np.testing.assert_allclose(
                outputs[GATE_DISTANCES], model.gate.stats.distances(features), rtol=1e-12
            )
            verdicts = []
            for index in range(len(images)):
                row = {name: value[index] for name, value in outputs.items()}
                alone = {name: value for name, value in row.items() if name != GATE_DISTANCES}
                pair = [
                    judge(model.meta, model.gate, outputs_of_one, Prepared(images[index]), False)
                    for outputs_of_one in (row, alone)
                ]
                verdicts.append(
                    [(j.scored, j.refusal and (j.refusal.code, j.refusal.message)) for j in pair]
                )
            assert all(batched == one for batched, one in verdicts)
            # The X-rays are scored, the noise refused: both ways of judging are covered.
            scored = [batched[0] is not None for batched, _ in verdicts]
            assert scored == [True] * len(xrays) + [False] * len(noise)
        finally:
            runner.close()

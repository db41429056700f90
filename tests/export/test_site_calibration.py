"""`pneumoscreen calibrate` end to end: real X-rays (tests/fixtures/chest_xray) as a site,
a tiny bundle as the model, the typer command as a user runs it, the result read back
with service.bundle and served by the real app over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from pneumoscreen.cli import app
from service.bundle import read_bundle
from tests.support.bundle_factory import make_tiny_bundle
from tests.support.live_server import live_server

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "chest_xray"
# The fixture site: 36 images; patients counted by hand from the file names
# (person1, person101, person1946 and IM-0429 have two images each).
N_IMAGES = {"NORMAL": 18, "PNEUMONIA": 18}
N_PATIENTS = {"NORMAL": 17, "PNEUMONIA": 15}
# A target and margin these 15 positive patients support (13 needed).
SMALL_SITE = ["--target-sensitivity", "0.9", "--margin", "0.25"]


def _invoke(*args: str):
    return CliRunner().invoke(app, ["calibrate", *args])


def _error_line(result) -> str:
    output = getattr(result, "stderr", None) or result.output
    return output.strip().splitlines()[-1]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _make_site(root: Path) -> Path:
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for split in ("train", "val"):
            for path in (FIXTURES / split / label).glob("*.jpeg"):
                shutil.copy(path, root / label / path.name)
    return root


def _reference_scores(bundle: Path, site: Path) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """P(positive) of every site image by onnxruntime directly, not through the runner."""
    from service.onnx_session import make_session
    from service.preprocessing import load_model_input

    meta = read_bundle(bundle)
    session = make_session(bundle / "model.onnx")
    paths = sorted(site.glob("*/*.jpeg"))
    images = np.stack(
        [load_model_input(p.read_bytes(), meta.input.height, meta.input.width) for p in paths]
    )
    (output,) = session.run(["probabilities"], {"image": images})
    rows = np.asarray(output, dtype=np.float64)
    rows /= rows.sum(axis=1, keepdims=True)
    positive = rows[:, meta.positive_indices()].sum(axis=1)
    y = np.array([p.parent.name == "PNEUMONIA" for p in paths])
    return y, positive, paths


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle with the extra files a newer bundle format may carry."""
    directory = tmp_path_factory.mktemp("source") / "default"
    make_tiny_bundle(directory, size=64)
    (directory / "MODEL_CARD.md").write_text("# Model card: tiny\n\nThreshold 0.5.\n")
    (directory / "gate_stats.json").write_text('{"mean": [1, 2, 3]}\n')
    (directory / "extra" / "deep").mkdir(parents=True)
    (directory / "extra" / "deep" / "table.bin").write_bytes(bytes(range(256)))
    (directory / "report").mkdir()
    (directory / "report" / "metrics.json").write_text('{"old": "validation report"}\n')
    return directory


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_site(tmp_path_factory.mktemp("sites") / "st-elsewhere")


@pytest.fixture(scope="module")
def calibrated(source: Path, site: Path, tmp_path_factory: pytest.TempPathFactory):
    before = _tree_digest(source)
    out = tmp_path_factory.mktemp("models") / "st-elsewhere"
    result = _invoke(
        "--model-dir", str(source), "--data", str(site), "--out", str(out), *SMALL_SITE
    )
    assert result.exit_code == 0, result.output
    assert _tree_digest(source) == before, "the source bundle was modified"
    return out, result.output


def test_new_threshold_follows_the_training_rule_on_the_site(
    source: Path, site: Path, calibrated
) -> None:
    out, _ = calibrated
    meta = read_bundle(out)
    y, scores, _ = _reference_scores(source, site)
    threshold = meta.threshold
    sensitivity = (scores[y] >= threshold).mean()
    assert sensitivity >= 0.9
    # The highest such threshold: any positive scored above it would lose the target.
    higher = np.unique(scores[y][scores[y] > threshold])
    assert all((scores[y] >= t).mean() < 0.9 for t in higher)
    assert meta.threshold != 0.5


def test_bundle_keeps_model_and_extra_files_and_records_the_calibration(
    source: Path, calibrated
) -> None:
    out, output = calibrated
    assert (out / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    meta, old = read_bundle(out, verify=True), read_bundle(source)
    assert meta.onnx_sha256 == old.onnx_sha256
    assert meta.version == "0.0.1+st.elsewhere" and meta.name == old.name
    assert (out / "gate_stats.json").read_bytes() == (source / "gate_stats.json").read_bytes()
    assert (out / "extra" / "deep" / "table.bin").read_bytes() == bytes(range(256))
    assert "validation report" not in (out / "report" / "metrics.json").read_text()
    assert sorted(p.name for p in (out / "report").iterdir()) == [
        "metrics.json",
        "site_calibration.md",
    ]
    card = (out / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: tiny") and "## Site calibration" in card

    record = meta.site_calibration
    assert record is not None
    assert record == json.loads((out / "report" / "metrics.json").read_text())
    assert record["data"] == "st-elsewhere" and record["folder"] == "."
    assert record["old_threshold"] == 0.5 and record["threshold"] == meta.threshold
    assert record["target_sensitivity"] == 0.9
    assert {label: c["images"] for label, c in record["counts"].items()} == N_IMAGES
    assert {label: c["patients"] for label, c in record["counts"].items()} == N_PATIENTS
    assert record["sufficiency"]["positives_needed"] == 13
    assert record["date"][:4].isdigit()
    cm = record["metrics"]["confusion_matrix"]
    assert cm["tp"] + cm["fn"] == 18 and cm["tn"] + cm["fp"] == 18
    for name in ("sensitivity", "specificity", "auc"):
        figure = record["metrics"][name]
        assert figure["ci95_low"] <= figure["value"] <= figure["ci95_high"], name
    assert record["metrics"]["sensitivity"]["value"] == pytest.approx(cm["tp"] / 18)
    assert f"{meta.threshold:.4f}" in output and "sensitivity" in output
    md = (out / "report" / "site_calibration.md").read_text()
    assert f"new {meta.threshold:.4f}" in md and "old 0.5000" in md


def test_calibrated_bundle_is_served_with_its_new_threshold(
    source: Path, site: Path, calibrated
) -> None:
    out, _ = calibrated
    meta = read_bundle(out)
    y, scores, paths = _reference_scores(source, site)
    at_threshold = paths[int(np.flatnonzero(y & (scores == meta.threshold))[0])]
    below = scores < meta.threshold
    just_below = paths[int(np.flatnonzero(below)[np.argmax(scores[below])])]
    with live_server(out) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        card = client.get("/model").json()
        assert card["threshold"] == meta.threshold
        assert card["version"] == meta.version
        assert card["site_calibration"]["data"] == "st-elsewhere"
        for path, positive in ((at_threshold, True), (just_below, False)):
            response = client.post(
                "/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["threshold"] == meta.threshold
            assert body["screen_positive"] is positive, (path.name, body)


def test_too_few_positives_is_refused_with_the_count_needed(
    source: Path, site: Path, tmp_path: Path
) -> None:
    out = tmp_path / "site-bundle"
    result = _invoke(
        "--model-dir",
        str(source),
        "--data",
        str(site),
        "--out",
        str(out),
        "--target-sensitivity",
        "0.95",
    )
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert line.startswith("error: too few site X-rays to support target sensitivity 0.95")
    assert "15 PNEUMONIA patients, at least 127 are needed" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_help_states_the_rule_with_the_figure_the_code_computes() -> None:
    from export.sample_size import positives_needed

    result = CliRunner().invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Wilson" in text and f"{positives_needed(0.95, 0.05)} patients" in text


def test_existing_out_needs_force_and_force_replaces_only_a_bundle(
    source: Path, site: Path, tmp_path: Path
) -> None:
    out = tmp_path / "site"
    args = ["--model-dir", str(source), "--data", str(site), "--out", str(out), *SMALL_SITE]
    out.mkdir()
    (out / "model.json").write_text("{}")
    (out / "stale.txt").write_text("from an earlier run")
    refused = _invoke(*args)
    assert refused.exit_code == 2
    assert "already exists; pass --force" in _error_line(refused)
    assert (out / "stale.txt").exists()

    forced = _invoke(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert not (out / "stale.txt").exists()
    assert read_bundle(out).site_calibration is not None
    assert [p.name for p in tmp_path.iterdir()] == ["site"], "staging folders left behind"

    not_a_bundle = tmp_path / "documents"
    not_a_bundle.mkdir()
    (not_a_bundle / "letter.txt").write_text("keep me")
    result = _invoke(
        "--model-dir",
        str(source),
        "--data",
        str(site),
        "--out",
        str(not_a_bundle),
        *SMALL_SITE,
        "--force",
    )
    assert result.exit_code == 2 and "is not a model bundle" in _error_line(result)
    assert (not_a_bundle / "letter.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_the_source_bundle_is_never_overwritten(source: Path, site: Path, where: str) -> None:
    before = _tree_digest(source)
    out = {"same": source, "parent": source.parent, "inside": source / "site"}[where]
    result = _invoke(
        "--model-dir", str(source), "--data", str(site), "--out", str(out), *SMALL_SITE, "--force"
    )
    assert result.exit_code == 2
    assert "would overwrite the source bundle" in _error_line(result)
    assert _tree_digest(source) == before


def test_standard_layout_test_folder_is_read(source: Path, tmp_path: Path) -> None:
    data = tmp_path / "hospital"
    _make_site(data / "test")
    (data / "train" / "NORMAL").mkdir(parents=True)  # present, and not read
    out = tmp_path / "out"
    result = _invoke(
        "--model-dir",
        str(source),
        "--data",
        str(data),
        "--out",
        str(out),
        *SMALL_SITE,
        "--bootstrap",
        "200",
    )
    assert result.exit_code == 0, result.output
    record = read_bundle(out).site_calibration
    assert record["folder"] == "test" and record["data"] == "hospital"
    assert {label: c["images"] for label, c in record["counts"].items()} == N_IMAGES


def test_missing_class_and_unknown_layout_are_refused(source: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _invoke(
        "--model-dir", str(source), "--data", str(empty), "--out", str(tmp_path / "o1")
    )
    assert result.exit_code == 2 and "no NORMAL/ or PNEUMONIA/ folder" in _error_line(result)
    one_class = tmp_path / "one"
    _make_site(one_class)
    shutil.rmtree(one_class / "NORMAL")
    (one_class / "NORMAL").mkdir()
    result = _invoke(
        "--model-dir", str(source), "--data", str(one_class), "--out", str(tmp_path / "o2")
    )
    assert result.exit_code == 2 and "needs X-rays of both classes" in _error_line(result)


def test_unreadable_image_is_refused_unless_skipped(source: Path, tmp_path: Path) -> None:
    data = _make_site(tmp_path / "site")
    (data / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = ["--model-dir", str(source), "--data", str(data), *SMALL_SITE, "--bootstrap", "200"]
    refused = _invoke(*args, "--out", str(tmp_path / "a"))
    assert refused.exit_code == 2
    assert "1 of 37 site images could not be read (first: NORMAL/broken.jpeg" in _error_line(
        refused
    )
    assert not (tmp_path / "a").exists()
    skipped = _invoke(*args, "--out", str(tmp_path / "b"), "--skip-unreadable")
    assert skipped.exit_code == 0, skipped.output
    record = read_bundle(tmp_path / "b").site_calibration
    assert record["skipped_unreadable"] == 1 and record["counts"]["NORMAL"]["images"] == 18


def test_three_label_model_scores_the_sum_of_its_positive_labels(
    site: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "three"
    make_tiny_bundle(bundle, size=64, labels=("NORMAL", "BACTERIAL", "VIRAL"))
    out = tmp_path / "three-site"
    result = _invoke(
        "--model-dir",
        str(bundle),
        "--data",
        str(site),
        "--out",
        str(out),
        *SMALL_SITE,
        "--bootstrap",
        "200",
    )
    assert result.exit_code == 0, result.output
    y, scores, _ = _reference_scores(bundle, site)
    assert read_bundle(out).threshold in set(scores[y].tolist())


def test_runs_without_tensorflow_or_scikit_learn(source: Path, site: Path, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pneumoscreen.cli import app\n"
        "from typer.testing import CliRunner\n"
        f"r = CliRunner().invoke(app, ['calibrate', '--model-dir', {str(source)!r}, "
        f"'--data', {str(site)!r}, '--out', {str(tmp_path / 'out')!r}, "
        "'--target-sensitivity', '0.9', '--margin', '0.25', '--bootstrap', '200'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = sorted(m for m in ('tensorflow', 'sklearn', 'tf2onnx', 'keras', 'scipy')"
        " if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr

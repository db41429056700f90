"""Site calibration: re-choose a bundle's threshold on a hospital's own labelled X-rays.

    calibrate_site(request) -> a new bundle folder:
      model.onnx        byte for byte the source's (same sha256)
      model.json        the source's, with the new threshold and a `site_calibration` record
      MODEL_CARD.md     the source's, with a "Site calibration" section appended
      report/           metrics.json and site_calibration.md (the source's report/ is not
                        copied: it describes the old operating point)
      everything else   copied unchanged (extra files a newer bundle format carries)

It runs in the serving install: images are decoded by service.preprocessing and scored
by service.inference.ModelRunner, exactly as the service scores uploads, and the
threshold is chosen by service.scoring.choose_threshold, the rule training uses. No
TensorFlow, no scikit-learn. docs/site-calibration.md describes the command and its rule.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from export.sample_size import DEFAULT_MARGIN, Sufficiency, assess, check_target
from export.site_data import AUTO, SiteData, SiteDataError, find_site_data
from service.bundle import META_FILE, MODEL_FILE, BundleError, BundleMeta, read_bundle, write_bundle
from service.patient_bootstrap import DEFAULT_REPLICATES, DEFAULT_SEED, bootstrap_figures
from service.preprocessing import ImageError, load_model_input
from service.scoring import choose_threshold
from training.data import NEGATIVE_LABEL, POSITIVE_LABEL

REPORT_DIR = "report"
REPORT_JSON = "metrics.json"
REPORT_MD = "site_calibration.md"
MODEL_CARD = "MODEL_CARD.md"
BATCH_SIZE = 16
# The site folders are NORMAL and PNEUMONIA whatever the model's labels (a three-label
# model's BACTERIAL and VIRAL both count as PNEUMONIA: their probabilities add up).
_POSITIVE, _NEGATIVE = POSITIVE_LABEL, NEGATIVE_LABEL


class CalibrationRefused(RuntimeError):
    """Calibration cannot (or must not) go ahead; the message is one line for the user."""


@dataclass(frozen=True)
class CalibrationRequest:
    model_dir: Path
    data: Path
    out: Path
    target_sensitivity: float = 0.95
    margin: float = DEFAULT_MARGIN
    min_negatives: int | None = None
    split: str = AUTO
    force: bool = False
    replicates: int = DEFAULT_REPLICATES
    seed: int = DEFAULT_SEED
    version: str | None = None
    skip_unreadable: bool = False


@dataclass(frozen=True)
class CalibrationResult:
    out: Path
    meta: BundleMeta
    record: dict[str, Any]


def calibrate_site(
    request: CalibrationRequest, progress: Callable[[str], None] = lambda _: None
) -> CalibrationResult:
    """Score the site's X-rays, choose the threshold, write the new bundle. Raises
    CalibrationRefused (nothing written) when the request or the data cannot support it."""
    try:
        check_target(request.target_sensitivity, request.margin)
    except ValueError as exc:
        raise CalibrationRefused(str(exc)) from None
    if request.min_negatives is not None and request.min_negatives < 1:
        raise CalibrationRefused("--min-negatives must be at least 1")
    _check_out(request.model_dir, request.out, request.force)
    try:
        source = read_bundle(request.model_dir, verify=True)
    except BundleError as exc:
        raise CalibrationRefused(str(exc)) from None
    try:
        site = find_site_data(request.data, request.split)
    except SiteDataError as exc:
        raise CalibrationRefused(str(exc)) from None
    _require_enough(site, request)

    progress(
        f"scoring {len(site.samples)} images of {request.data} with {source.name} {source.version}"
    )
    scores, unreadable, providers = _score(request.model_dir, site)
    if unreadable:
        first_path, first_reason = unreadable[0]
        if not request.skip_unreadable:
            raise CalibrationRefused(
                f"{len(unreadable)} of {len(site.samples)} site images could not be read "
                f"(first: {first_path}: {first_reason}); fix or remove them, "
                "or pass --skip-unreadable"
            )
        progress(
            f"skipped {len(unreadable)} unreadable images (first: {first_path}: {first_reason})"
        )
        kept = [i for i, score in enumerate(scores) if score is not None]
        site = SiteData(site.root, site.folder, [site.samples[i] for i in kept])
        scores = [scores[i] for i in kept]
        _require_enough(site, request)

    y = np.array([s.label == _POSITIVE for s in site.samples])
    values = np.array(scores, dtype=np.float64)
    patients = [s.patient for s in site.samples]
    threshold = choose_threshold(y, values, request.target_sensitivity)
    new_figures = bootstrap_figures(
        y, values, patients, threshold, request.replicates, request.seed
    )
    old_figures = bootstrap_figures(
        y, values, patients, source.threshold, request.replicates, request.seed
    )
    sufficiency = _require_enough(site, request)
    record = _record(
        request,
        source,
        site,
        threshold,
        y,
        values,
        new_figures,
        old_figures,
        sufficiency,
        len(unreadable),
        providers,
    )
    meta = source.model_copy(
        update={
            "threshold": threshold,
            "version": request.version or site_version(source.version, request.out.name),
            "site_calibration": record,
        }
    )
    meta = _write(request, meta, record)
    return CalibrationResult(request.out, meta, record)


def site_version(source_version: str, site_name: str) -> str:
    """`1.0.0` calibrated into models/St Mary's -> `1.0.0+st.mary.s` (a PEP 440 local
    version), so responses and /model tell the site bundle from the source."""
    local = re.sub(r"[^a-z0-9]+", ".", site_name.lower()).strip(".") or "site"
    return f"{source_version.split('+', 1)[0]}+{local}"


# --- checks ---------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_out(source: Path, out: Path, force: bool) -> None:
    source_dir, out_dir = source.resolve(), out.resolve()
    if _inside(source_dir, out_dir) or _inside(out_dir, source_dir):
        raise CalibrationRefused(
            f"--out {out} would overwrite the source bundle {source}; choose another folder"
        )
    if not out.exists():
        return
    if not force:
        raise CalibrationRefused(f"--out {out} already exists; pass --force to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file()):
        raise CalibrationRefused(
            f"--out {out} exists and is not a model bundle; --force only replaces a bundle "
            "(or an empty folder)"
        )


def _require_enough(site: SiteData, request: CalibrationRequest) -> Sufficiency:
    sufficiency = assess(
        request.target_sensitivity,
        request.margin,
        site.patients(_POSITIVE),
        site.patients(_NEGATIVE),
        request.min_negatives,
    )
    reason = sufficiency.shortfall(_POSITIVE, _NEGATIVE)
    if reason is not None:
        raise CalibrationRefused(reason)
    return sufficiency


# --- scoring --------------------------------------------------------------------------


def _score(
    model_dir: Path, site: SiteData
) -> tuple[list[float | None], list[tuple[str, str]], list[str]]:
    """P(positive) per image as the service computes it (None where unreadable)."""
    from pydantic import ValidationError

    from service.bundle import OUTPUT_NAME
    from service.config import Settings
    from service.inference import ModelRunner, score

    try:
        settings = Settings(model_dir=model_dir)
    except ValidationError as exc:
        raise CalibrationRefused(f"invalid service settings in the environment: {exc}") from None
    runner = ModelRunner(settings)
    try:
        runner.load()
        if not runner.ready or runner.meta is None:
            raise CalibrationRefused(f"the model could not be loaded: {runner.error}")
        meta = runner.meta
        height, width = meta.input.height, meta.input.width
        limits = settings.decode_limits()
        scores: list[float | None] = [None] * len(site.samples)
        unreadable: list[tuple[str, str]] = []
        batch: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            outputs = runner.predict_outputs([img for _, img in batch])
            for (index, _), row in zip(batch, outputs, strict=True):
                scores[index] = score(meta, row[OUTPUT_NAME]).positive_probability
            batch.clear()

        for index, sample in enumerate(site.samples):
            try:
                image = load_model_input(sample.path.read_bytes(), height, width, limits)
            except (ImageError, OSError) as exc:
                reason = exc.message if isinstance(exc, ImageError) else type(exc).__name__
                unreadable.append((str(sample.path.relative_to(site.root)), reason))
                continue
            batch.append((index, image))
            if len(batch) == BATCH_SIZE:
                flush()
        if batch:
            flush()
        return scores, unreadable, list(runner.providers)
    finally:
        runner.close()


# --- the record -----------------------------------------------------------------------


def _tool_versions() -> dict[str, str]:
    versions = {}
    for name in ("pneumoscreen", "onnxruntime", "onnxruntime-gpu", "numpy", "pillow", "pydicom"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def _confusion(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    flagged = scores >= threshold
    return {
        "tn": int((~y & ~flagged).sum()),
        "fp": int((~y & flagged).sum()),
        "fn": int((y & ~flagged).sum()),
        "tp": int((y & flagged).sum()),
    }


def _record(
    request: CalibrationRequest,
    source: BundleMeta,
    site: SiteData,
    threshold: float,
    y: np.ndarray,
    scores: np.ndarray,
    new_figures: dict,
    old_figures: dict,
    sufficiency: Sufficiency,
    skipped: int,
    providers: list[str],
) -> dict[str, Any]:
    target = request.target_sensitivity
    return {
        "data": request.data.resolve().name,
        "folder": site.folder,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "threshold": threshold,
        "old_threshold": source.threshold,
        "target_sensitivity": target,
        "threshold_rule": (
            f"highest threshold with sensitivity >= {target:g} on the site's labelled X-rays "
            "(service.scoring.choose_threshold, the rule training uses)"
        ),
        "source_bundle": {
            "name": source.name,
            "version": source.version,
            "onnx_sha256": source.onnx_sha256,
        },
        "counts": {
            label: {"images": site.images(label), "patients": site.patients(label)}
            for label in (_NEGATIVE, _POSITIVE)
        },
        "skipped_unreadable": skipped,
        "sufficiency": {
            "rule": sufficiency.rule(),
            "margin": sufficiency.margin,
            "positive_patients": sufficiency.positives,
            "negative_patients": sufficiency.negatives,
            "positives_needed": sufficiency.positives_needed,
            "negatives_needed": sufficiency.negatives_needed,
        },
        "metrics": {
            **{name: estimate.as_dict() for name, estimate in new_figures.items()},
            "confusion_matrix": _confusion(y, scores, threshold),
        },
        "at_old_threshold": {
            **{name: estimate.as_dict() for name, estimate in old_figures.items() if name != "auc"},
            "confusion_matrix": _confusion(y, scores, source.threshold),
        },
        "bootstrap": {
            "replicates": request.replicates,
            "seed": request.seed,
            "unit": "patient, resampled within class (stratified cluster bootstrap)",
            "interval": "percentile, 2.5 and 97.5",
            "threshold": "fixed at the chosen value",
        },
        "providers": providers,
        "tool_versions": _tool_versions(),
    }


# --- writing --------------------------------------------------------------------------


def _copy_extra_files(source: Path, target: Path) -> None:
    """Every file of the source bundle but model.json, model.onnx (write_bundle copies it)
    and report/, so files a newer bundle format adds travel with the model."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] == REPORT_DIR or relative in (Path(META_FILE), Path(MODEL_FILE)):
            continue
        destination = target / relative
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)


def _with_interval(estimate: dict[str, float]) -> str:
    return (
        f"{estimate['value']:.3f} (95% CI {estimate['ci95_low']:.3f}-{estimate['ci95_high']:.3f})"
    )


def _report_markdown(meta: BundleMeta, record: dict[str, Any]) -> str:
    counts, metrics, old = record["counts"], record["metrics"], record["at_old_threshold"]
    sufficiency = record["sufficiency"]
    lines = [
        f"# Site calibration: {meta.name} {meta.version}",
        "",
        f"Data: `{record['data']}` (folder `{record['folder']}`), calibrated {record['date']}.",
        "",
        "| class | images | patients |",
        "|---|---|---|",
        *(f"| {label} | {c['images']} | {c['patients']} |" for label, c in counts.items()),
        "",
        f"Skipped unreadable images: {record['skipped_unreadable']}.",
        "",
        f"Rule: {record['threshold_rule']}.",
        "",
        "| threshold | sensitivity | specificity |",
        "|---|---|---|",
        (
            f"| new {record['threshold']:.4f} | {_with_interval(metrics['sensitivity'])} | "
            f"{_with_interval(metrics['specificity'])} |"
        ),
        (
            f"| old {record['old_threshold']:.4f} | {_with_interval(old['sensitivity'])} | "
            f"{_with_interval(old['specificity'])} |"
        ),
        "",
        (
            f"AUC {_with_interval(metrics['auc'])}. Confusion matrix at the new threshold: "
            f"{metrics['confusion_matrix']}."
        ),
        "",
        (
            f"Intervals: patient-level bootstrap ({record['bootstrap']['replicates']} replicates, "
            f"seed {record['bootstrap']['seed']}), the threshold held fixed. The threshold was "
            "chosen on these same images, so the sensitivity here reaches the target by "
            "construction; the interval shows how far it could move on the site's next patients."
        ),
        "",
        (
            f"Enough data: {sufficiency['positive_patients']} positive patients (needed "
            f"{sufficiency['positives_needed']}), {sufficiency['negative_patients']} negative "
            f"patients (needed {sufficiency['negatives_needed']}); {sufficiency['rule']}."
        ),
        "",
    ]
    return "\n".join(lines)


def _model_card_section(meta: BundleMeta, record: dict[str, Any]) -> str:
    metrics, counts = record["metrics"], record["counts"]
    images = sum(c["images"] for c in counts.values())
    patients = sum(c["patients"] for c in counts.values())
    return (
        "\n## Site calibration\n"
        f"This bundle ({meta.name} {meta.version}) is the model above with its threshold "
        f"re-chosen by `pneumoscreen calibrate` on `{record['data']}` ({record['date']}): it "
        f"screens positive at P({meta.positive_label}) >= {record['threshold']:.4f} (was "
        f"{record['old_threshold']:.4f}). On the site's {images} images of {patients} "
        f"patients: sensitivity {_with_interval(metrics['sensitivity'])}, specificity "
        f"{_with_interval(metrics['specificity'])}, AUC {_with_interval(metrics['auc'])} "
        "(patient-level bootstrap). The figures in the sections above are the training "
        "validation's, at the old threshold. Details: report/site_calibration.md, and "
        "`site_calibration` in model.json.\n"
    )


def _fresh_folder(out: Path, purpose: str) -> Path:
    """An empty hidden folder beside `out` (same file system, so moves are renames), with
    the umask's permissions (tempfile.mkdtemp's 0700 would hide the bundle from a server
    running as another user)."""
    folder = out.parent / f".{out.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


def _write(request: CalibrationRequest, meta: BundleMeta, record: dict[str, Any]) -> BundleMeta:
    """Build the bundle beside --out, verify it, then move it into place."""
    import json

    out = request.out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_folder(out, "calibrating")
    try:
        _copy_extra_files(request.model_dir, staging)
        card = staging / MODEL_CARD
        if card.is_file():
            card.write_text(
                card.read_text().rstrip("\n") + "\n" + _model_card_section(meta, record)
            )
        meta = write_bundle(staging, request.model_dir / MODEL_FILE, meta)
        report = staging / REPORT_DIR
        report.mkdir()
        (report / REPORT_JSON).write_text(json.dumps(record, indent=2) + "\n")
        (report / REPORT_MD).write_text(_report_markdown(meta, record))
        read_bundle(staging, verify=True)
        _check_out(request.model_dir, out, request.force)  # again: scoring took a while
        if out.exists():
            retired = _fresh_folder(out, "replaced")
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return meta

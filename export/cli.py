"""`pneumoscreen export`: Keras run -> ONNX bundle. TensorFlow is imported only when run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from export.bundle_target import TargetRefused, check_target, default_out
from training.cli import CacheDirOption
from training.data import DATA_CREDIT, DEFAULT_CACHE_DIR


def export_command(
    run: Annotated[
        Path, typer.Option(help="Run folder written by `train`.", exists=True, file_okay=False)
    ],
    data: Annotated[
        Path,
        typer.Option(
            help="The data folder the run was trained on (real X-rays for the parity check).",
            exists=True,
            file_okay=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Bundle folder to write (default: <run>/bundle, a new folder; an existing "
            "bundle, such as the served models/default, only with --force)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name (default from the run).")] = None,
    version: Annotated[str, typer.Option(help="Model version.")] = "1.0.0",
    data_source: Annotated[
        str,
        typer.Option(
            help="Where the training data came from and its licence, for model.json and the "
            "model card (default: the Kermany pediatric chest X-ray set)."
        ),
    ] = DATA_CREDIT,
    cache_dir: CacheDirOption = DEFAULT_CACHE_DIR,
    gate_acceptance: Annotated[
        float,
        typer.Option(
            help="Share of the run's validation X-rays the input gate must accept; its "
            "threshold is that quantile of their feature distances.",
            min=0.5,
            max=1.0,
        ),
    ] = 0.995,
    gate_rotation_images: Annotated[
        int,
        typer.Option(
            help="Training X-rays (evenly thinned) turned by 90, 180 and 270 degrees to fit "
            "the gate's rotated classes.",
            min=8,
        ),
    ] = 1024,
    gate_components: Annotated[
        int,
        typer.Option(
            help="Principal components of the features the gate's Gaussians are fitted in.", min=2
        ),
    ] = 64,
    gate_confidence: Annotated[
        float,
        typer.Option(
            help="Confidence of the upper bound of that quantile the gate's thresholds are set "
            "at (a margin for estimating it from a few hundred validation images).",
            min=0.5,
            max=0.999,
        ),
    ] = 0.95,
    gate_renditions: Annotated[
        bool,
        typer.Option(
            help="Also fit and threshold the gate on serving renditions of the X-rays (as a "
            "full-resolution upload reaches the model: export/serving_renditions.py)."
        ),
    ] = True,
    int8_out: Annotated[
        Path | None,
        typer.Option(
            help="Also write an INT8 bundle here (static quantization calibrated on training "
            "images, with its own validation metrics beside the FP32 ones)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the bundle already in --out (and --int8-out).")
    ] = False,
) -> None:
    """Convert to ONNX (tf2onnx, opset 17) with the features and CAM outputs, prove parity
    with Keras, fit the input gate, write the bundle (format 2)."""
    out = default_out(run) if out is None else out
    try:
        check_target(out, force)
        if int8_out is not None:
            check_target(int8_out, force, option="--int8-out")
    except TargetRefused as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None

    from export.onnx_export import export_run

    export_run(
        run,
        out,
        data,
        name=name,
        version=version,
        data_source=data_source,
        cache_dir=cache_dir,
        gate_acceptance=gate_acceptance,
        gate_rotation_images=gate_rotation_images,
        gate_components=gate_components,
        gate_confidence=gate_confidence,
        gate_renditions=gate_renditions,
    )
    if int8_out is not None:
        from export.quantize import quantize_bundle

        quantize_bundle(out, int8_out, run, data, cache_dir=cache_dir)

"""`pneumoscreen export`: Keras run -> ONNX bundle. TensorFlow is imported only when run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training.cli import CacheDirOption
from training.data import DATA_CREDIT, DEFAULT_CACHE_DIR


def export_command(
    run: Annotated[Path, typer.Option(help="Run folder written by `train`.", exists=True,
                                      file_okay=False)],
    data: Annotated[Path, typer.Option(
        help="The data folder the run was trained on (real X-rays for the parity check).",
        exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")] = Path("models/default"),
    name: Annotated[str | None, typer.Option(help="Model name (default from the run).")] = None,
    version: Annotated[str, typer.Option(help="Model version.")] = "1.0.0",
    data_source: Annotated[str, typer.Option(
        help="Where the training data came from and its licence, for model.json and the "
             "model card (default: the Kermany pediatric chest X-ray set).")] = DATA_CREDIT,
    cache_dir: CacheDirOption = DEFAULT_CACHE_DIR,
    int8_out: Annotated[Path | None, typer.Option(
        help="Also write an INT8 bundle here (static quantization calibrated on training "
             "images, with its own validation metrics beside the FP32 ones).")] = None,
) -> None:
    """Convert to ONNX (tf2onnx, opset 17), prove parity with Keras, write the bundle."""
    from export.onnx_export import export_run

    export_run(run, out, data, name=name, version=version, data_source=data_source,
               cache_dir=cache_dir)
    if int8_out is not None:
        from export.quantize import quantize_bundle

        quantize_bundle(out, int8_out, run, data, cache_dir=cache_dir)

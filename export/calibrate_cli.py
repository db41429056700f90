"""`pneumoscreen calibrate`: a site's own threshold, in the serving install.

Heavy imports (onnxruntime) wait until the command runs, so `pneumoscreen --help` stays
fast and this module is safe to import from service/cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from export.sample_size import DEFAULT_MARGIN
from export.site_data import AUTO
from service.patient_bootstrap import DEFAULT_REPLICATES, DEFAULT_SEED

REFUSED_EXIT_CODE = 2


def calibrate_command(
    data: Annotated[
        Path,
        typer.Option(
            help="The site's labelled X-rays: <data>/{NORMAL,PNEUMONIA}/* or "
            "<data>/test/{NORMAL,PNEUMONIA}/* (JPEG, PNG or DICOM files)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(help="Folder of the new bundle, e.g. models/<site>. Never the source bundle."),
    ],
    model_dir: Annotated[
        Path, typer.Option(help="The bundle to calibrate (left untouched).")
    ] = Path("models/default"),
    target_sensitivity: Annotated[
        float,
        typer.Option(help="Sensitivity the new threshold must reach on the site's positives."),
    ] = 0.95,
    margin: Annotated[
        float,
        typer.Option(
            help="How far below the target the lower bound of the 95% Wilson interval on "
            "sensitivity may fall; sets how many positive patients are needed."
        ),
    ] = DEFAULT_MARGIN,
    min_negatives: Annotated[
        int | None,
        typer.Option(help="NORMAL patients needed (default: as many as the positives needed)."),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            help="Sub-folder of --data holding NORMAL/ and PNEUMONIA/ (auto: --data itself "
            "when it has them, else test)."
        ),
    ] = AUTO,
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out if it is an existing bundle.")
    ] = False,
    bootstrap: Annotated[
        int, typer.Option(help="Patient-level bootstrap replicates for the 95% intervals.", min=100)
    ] = DEFAULT_REPLICATES,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = DEFAULT_SEED,
    version: Annotated[
        str | None,
        typer.Option(
            help="Version of the new bundle (default: the source's + the --out folder name, "
            "e.g. 1.0.0+st.marys)."
        ),
    ] = None,
    skip_unreadable: Annotated[
        bool,
        typer.Option(
            "--skip-unreadable",
            help="Leave out images that cannot be decoded (counted in the "
            "report) instead of refusing.",
        ),
    ] = False,
) -> None:
    """Re-choose the threshold on a site's own labelled X-rays and write a new bundle.

    The threshold is the highest with sensitivity >= --target-sensitivity on the site's
    images (the rule training uses). The new bundle has the same model.onnx (copied byte
    for byte), a model.json with the new threshold and a `site_calibration` record, and
    report/ with patient-level bootstrap 95% intervals for sensitivity, specificity and
    AUC.

    Refuses (exit code 2, nothing written) when the site has too few patients: with n
    PNEUMONIA patients the rule keeps ceil(target * n) of them, and the lower bound of the
    two-sided 95% Wilson interval of that sensitivity must reach target - margin, for n
    and every larger count (0.95 and 0.05: 127 patients); at least as many NORMAL
    patients are needed. Also refuses when --out exists (without --force) or overlaps the
    source bundle. See docs/site-calibration.md.
    """
    from export.site_calibration import CalibrationRefused, CalibrationRequest, calibrate_site

    request = CalibrationRequest(
        model_dir=model_dir,
        data=data,
        out=out,
        target_sensitivity=target_sensitivity,
        margin=margin,
        min_negatives=min_negatives,
        split=split,
        force=force,
        replicates=bootstrap,
        seed=seed,
        version=version,
        skip_unreadable=skip_unreadable,
    )
    try:
        result = calibrate_site(request, progress=lambda line: typer.echo(line, err=True))
    except CalibrationRefused as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=REFUSED_EXIT_CODE) from None
    record = result.record
    metrics = record["metrics"]

    def show(name: str) -> str:
        figure = metrics[name]
        return f"{figure['value']:.3f} [{figure['ci95_low']:.3f}, {figure['ci95_high']:.3f}]"

    typer.echo(
        f"wrote {result.out} ({result.meta.name} {result.meta.version}): threshold "
        f"{record['threshold']:.4f} (was {record['old_threshold']:.4f}); on the site: "
        f"sensitivity {show('sensitivity')}, specificity {show('specificity')}, "
        f"AUC {show('auc')} (patient-level bootstrap 95% intervals)"
    )

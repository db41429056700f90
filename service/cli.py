"""`pneumoscreen`: one command line for the whole product.

    pneumoscreen serve      run the HTTP API on a model bundle          (serve extra)
    pneumoscreen train      fine-tune a CNN on a folder of X-rays       (train extra)
    pneumoscreen evaluate   report metrics of a trained run on a split  (train extra)
    pneumoscreen export     Keras -> ONNX, parity check, write a bundle (train extra)
    pneumoscreen calibrate  re-choose a bundle's threshold on a site's X-rays (serve extra)

TensorFlow is imported only inside the training commands, so `serve` works in an
install without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from export.calibrate_cli import calibrate_command
from export.cli import export_command
from training.cli import evaluate_command, train_command

app = typer.Typer(
    name="pneumoscreen",
    help="Pediatric chest X-ray pneumonia screening aid (not a diagnosis).",
    no_args_is_help=True,
    add_completion=False,
)
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("export")(export_command)
app.command("calibrate")(calibrate_command)


@app.command("serve")
def serve_command(
    model_dir: Annotated[
        Path | None, typer.Option(help="Bundle folder (model.onnx + model.json). Env: MODEL_DIR.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind. Env: HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port. Env: PORT.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes, each with its own model. Env: WORKERS.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="Env: LOG_LEVEL.")] = None,
) -> None:
    """Serve /predict, /predict/batch, /health, /model, /metrics and /docs over HTTP."""
    from service.bundle import BundleError, read_bundle
    from service.config import Settings
    from service.server import serve

    # Command-line options win over the environment; the app reads them back through
    # Settings, so every worker process sees the same configuration.
    overrides = {"MODEL_DIR": model_dir, "HOST": host, "PORT": port, "WORKERS": workers,
                 "LOG_LEVEL": log_level}
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = str(value)
    settings = Settings()
    try:
        meta = read_bundle(settings.model_dir)
    except BundleError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"serving {meta.name} {meta.version} from {settings.model_dir} "
               f"on http://{settings.host}:{settings.port} (docs at /docs)")
    # uvicorn with the HTTP budgets and the SIGTERM drain (service/server.py).
    serve(settings)


if __name__ == "__main__":
    app()

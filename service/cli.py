"""`pneumoscreen serve`: the service's own command (the command line itself is assembled in
pneumoscreen/cli.py; this module imports nothing from training/ or export/).

`python -m service.cli serve` runs it without the other commands (tests/support/live_server.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

SETTINGS_EXIT_CODE = 2

app = typer.Typer(
    name="pneumoscreen", no_args_is_help=True, add_completion=False, rich_markup_mode=None
)


@app.callback()
def _root() -> None:
    """`pneumoscreen serve` alone (the full command line: `pneumoscreen`)."""


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
    from pydantic import ValidationError

    from service.bundle import BundleError, read_bundle
    from service.config import Settings
    from service.server import serve
    from service.settings_errors import settings_error_lines

    # Command-line options win over the environment; the app reads them back through
    # Settings, so every worker process sees the same configuration.
    overrides = {
        "MODEL_DIR": model_dir,
        "HOST": host,
        "PORT": port,
        "WORKERS": workers,
        "LOG_LEVEL": log_level,
    }
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = str(value)
    try:
        settings = Settings()
    except ValidationError as exc:
        for line in settings_error_lines(exc):
            typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=SETTINGS_EXIT_CODE) from None
    try:
        meta = read_bundle(settings.model_dir)
    except BundleError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    typer.echo(
        f"serving {meta.name} {meta.version} from {settings.model_dir} "
        f"on http://{settings.host}:{settings.port} (docs at /docs)"
    )
    # uvicorn with the HTTP budgets and the SIGTERM drain (service/server.py).
    serve(settings)


if __name__ == "__main__":
    app()

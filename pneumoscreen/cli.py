"""`pneumoscreen`: one command line for the whole product, assembled at the edge.

    pneumoscreen serve      run the HTTP API on a model bundle                  (serve extra)
    pneumoscreen train      fine-tune a CNN on a folder of X-rays               (train extra)
    pneumoscreen evaluate   report metrics of a trained run on a split          (train extra)
    pneumoscreen crossval   pool k-fold members: per-fold and pooled figures    (train extra)
    pneumoscreen ensemble   several runs as one model (one graph, one bundle)   (train extra)
    pneumoscreen export     Keras -> ONNX, parity check, write a bundle         (train extra)
    pneumoscreen calibrate  re-choose a bundle's threshold on a site's X-rays   (serve extra)

This module only assembles the commands: each lives in the package it belongs to
(service/cli.py, training/cli.py, export/cli.py, export/calibrate_cli.py) and is imported
only when it is run (or when `pneumoscreen --help` lists it), so `pneumoscreen serve`
never imports training code, and a command whose extra is not installed ends in one line
saying which extra to install (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

USAGE_EXIT_CODE = 2  # click's own code for a usage error; also a missing extra
HELP_WIDTH = 100  # --help wraps at the terminal's width up to this many columns

# The top-level modules each extra brings; a ModuleNotFoundError naming one of them means
# the extra is not installed (anything else is a real bug and keeps its traceback).
EXTRA_MODULES = {
    "train": frozenset({"tensorflow", "keras", "tf2onnx", "onnx", "sklearn", "matplotlib"}),
    "serve": frozenset(
        {
            "fastapi",
            "starlette",
            "uvicorn",
            "httptools",
            "pydantic_settings",
            "multipart",
            "python_multipart",
            "onnxruntime",
            "prometheus_client",
            "swagger_ui_bundle",
            "highdicom",
            "fhir",
            "threadpoolctl",
        }
    ),
}


def extra_hint(extra: str) -> str:
    return f"install the {extra} extra: pip install -e '.[{extra}]'"


@dataclass(frozen=True)
class CommandSpec:
    module: str  # where the typer-annotated function lives
    function: str
    extra: str  # the optional dependencies it needs


COMMANDS: dict[str, CommandSpec] = {
    "serve": CommandSpec("service.cli", "serve_command", "serve"),
    "train": CommandSpec("training.cli", "train_command", "train"),
    "evaluate": CommandSpec("training.cli", "evaluate_command", "train"),
    "crossval": CommandSpec("training.cli", "crossval_command", "train"),
    "ensemble": CommandSpec("training.cli", "ensemble_command", "train"),
    "export": CommandSpec("export.cli", "export_command", "train"),
    "calibrate": CommandSpec("export.calibrate_cli", "calibrate_command", "serve"),
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that would have provided the module `exc` misses, or None."""
    root = (exc.name or "").split(".")[0]
    for extra, modules in EXTRA_MODULES.items():
        if root in modules:
            return extra
    return None


def _exit_for_missing_extra(exc: ModuleNotFoundError, fallback: str) -> None:
    extra = missing_extra(exc) or fallback
    root = (exc.name or "a module").split(".")[0]
    typer.secho(
        f"error: {root} is not installed; {extra_hint(extra)}", fg=typer.colors.RED, err=True
    )
    raise typer.Exit(code=USAGE_EXIT_CODE) from None


def _guard_extra(callback: Callable[..., Any], extra: str) -> Callable[..., Any]:
    """`callback`, ending in the install hint when it imports a module of a missing extra
    (the commands import TensorFlow, scikit-learn, onnxruntime only once they run)."""

    @functools.wraps(callback)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except ModuleNotFoundError as exc:
            if missing_extra(exc) is None:
                raise
            _exit_for_missing_extra(exc, extra)

    return guarded


def _single(name: str, function: Callable[..., Any], **settings: Any) -> TyperCommand:
    single = typer.Typer(add_completion=False, rich_markup_mode=None)
    single.command(name, **settings)(function)
    command = typer.main.get_command(single)
    assert isinstance(command, TyperCommand)
    return command


def _unavailable(name: str, spec: CommandSpec, exc: ModuleNotFoundError) -> TyperCommand:
    """A stand-in for a command whose module cannot be imported in this install."""

    def explain(ctx: typer.Context) -> None:
        _exit_for_missing_extra(exc, spec.extra)

    return _single(
        name,
        explain,
        help=f"(not available: {extra_hint(spec.extra)})",
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


def load_command(name: str, spec: CommandSpec) -> TyperCommand:
    try:
        function = getattr(importlib.import_module(spec.module), spec.function)
    except ModuleNotFoundError as exc:
        # An image that leaves out training/ or export/ is a missing extra too.
        ours = (exc.name or "").split(".")[0] in {"service", "training", "export"}
        if missing_extra(exc) is None and not ours:
            raise
        return _unavailable(name, spec, exc)
    command = _single(name, function)
    command.callback = _guard_extra(command.callback, spec.extra)  # type: ignore[arg-type]
    return command


class LazyCommands(TyperGroup):
    """Click's lazy-loading group: a command's module is imported when it is looked up."""

    def list_commands(self, ctx: typer.Context) -> list[str]:  # type: ignore[override]
        return [*super().list_commands(ctx), *COMMANDS]

    def get_command(  # type: ignore[override]
        self, ctx: typer.Context, cmd_name: str
    ) -> TyperCommand | None:
        if cmd_name in COMMANDS:
            return load_command(cmd_name, COMMANDS[cmd_name])
        return super().get_command(ctx, cmd_name)  # type: ignore[return-value]


app = typer.Typer(
    name="pneumoscreen",
    cls=LazyCommands,
    help="Pediatric chest X-ray pneumonia screening aid (not a diagnosis).",
    no_args_is_help=True,
    add_completion=False,
    # Click's own help layout: it wraps long option names onto their own line where
    # rich's tables cut them ("--fine-tune-learn…") at 80 columns.
    rich_markup_mode=None,
    context_settings={"max_content_width": HELP_WIDTH},
)


@app.callback()
def _root() -> None:
    """Pediatric chest X-ray pneumonia screening aid (not a diagnosis)."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()

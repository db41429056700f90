"""The `pneumoscreen` command line as a new user meets it: every command run in a fresh
interpreter (what the console script does), with the output checked line by line.

A serving-only install is simulated by blocking the train extra's modules
(`sys.modules[name] = None` makes `import name` raise ModuleNotFoundError, as when the
package is absent).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pneumoscreen.cli import COMMANDS, extra_hint, load_command
from tests.support.bundle_factory import make_tiny_bundle

REPO = Path(__file__).resolve().parents[1]
TRAIN_EXTRA = ("tensorflow", "keras", "tf2onnx", "onnx", "sklearn", "matplotlib")
CLI_TIMEOUT_S = 120  # a fresh interpreter importing typer, numpy, onnxruntime on a loaded machine


def run_cli(
    args: list[str],
    *,
    block: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    after: str = "",
) -> subprocess.CompletedProcess[str]:
    """`pneumoscreen <args>` in a new interpreter, with `block` made unimportable; `after`
    runs once the command returned (it sees `sys.modules`)."""
    script = (
        "import sys\n"
        f"for name in {block!r}: sys.modules[name] = None\n"
        "from pneumoscreen.cli import app\n"
        f"try:\n    app({args!r}, prog_name='pneumoscreen')\n"
        f"except SystemExit as exit_:\n    code = exit_.code\n"
        f"{after}\n"
        "sys.exit(code)\n"
    )
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


# ------------------------------------------------------------------ dependency direction


def loaded_after(statement: str) -> set[str]:
    script = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=CLI_TIMEOUT_S,
        check=True,
    ).stdout
    return {name.split(".")[0] for name in out.split()}


@pytest.mark.parametrize("module", ["pneumoscreen.cli", "service.cli"])
def test_importing_the_command_line_imports_no_training_code(module: str) -> None:
    loaded = loaded_after(f"import {module}")
    assert not loaded & {"training", "export", "tensorflow", "keras", "sklearn", "tf2onnx"}


def test_serve_is_assembled_without_training_or_export_code() -> None:
    result = run_cli(["serve", "--help"], after="print('LOADED', ' '.join(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr
    loaded = {name.split(".")[0] for name in result.stdout.split("LOADED", 1)[1].split()}
    assert "service" in loaded
    assert not loaded & {"training", "export", "tensorflow", "keras", "sklearn"}


def test_console_script_is_the_edge_module() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["pneumoscreen"] == "pneumoscreen.cli:main"


# ------------------------------------------------------------------ a missing extra


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    return run


@pytest.mark.parametrize("command", ["train", "evaluate", "export"])
def test_training_commands_without_the_train_extra_say_what_to_install(
    command: str, run_folder: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    args = {
        "train": ["train", "--data", str(data), "--out", str(tmp_path / "new-run")],
        "evaluate": ["evaluate", "--run", str(run_folder), "--data", str(data)],
        "export": ["export", "--run", str(run_folder), "--data", str(data)],
    }[command]
    result = run_cli(args, block=TRAIN_EXTRA)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert lines[0].endswith("install the train extra: pip install -e '.[train]'")


# ------------------------------------------------------------------ bad settings


@pytest.mark.parametrize(
    ("args", "env", "setting", "allowed"),
    [
        (["serve", "--port", "70000"], {}, "PORT=70000", "less than or equal to 65535"),
        (
            ["serve"],
            {"LOG_LEVEL": "verbose"},
            "LOG_LEVEL=verbose",
            "critical, error, warning, info, debug, trace",
        ),
        (["serve"], {"WORKERS": "0"}, "WORKERS=0", "greater than or equal to 1"),
        (["serve"], {"ALLOWED_TYPES": "gif"}, "ALLOWED_TYPES", "dicom"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_and_what_is_allowed(
    args: list[str], env: dict[str, str], setting: str, allowed: str, tiny_bundle: Path
) -> None:
    result = run_cli([*args, "--model-dir", str(tiny_bundle)], env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {setting}") and allowed in lines[0], lines[0]


# ------------------------------------------------------------------ export's target folder


def test_export_refuses_to_overwrite_a_bundle_without_force(
    run_folder: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    served = tmp_path / "models" / "default"
    make_tiny_bundle(served, size=32)
    before = {p.name: p.read_bytes() for p in served.iterdir() if p.is_file()}

    refused = run_cli(
        ["export", "--run", str(run_folder), "--data", str(data), "--out", str(served)]
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        (
            f"error: --out {served} already holds a bundle; pass --force to replace it "
            "(is it the one being served?)"
        )
    ]
    assert {p.name: p.read_bytes() for p in served.iterdir() if p.is_file()} == before

    # With --force the check lets it through: here it stops at the missing train extra.
    forced = run_cli(
        ["export", "--run", str(run_folder), "--data", str(data), "--out", str(served), "--force"],
        block=TRAIN_EXTRA,
    )
    assert forced.returncode == 2
    assert forced.stderr.strip().endswith(extra_hint("train"))


def test_export_defaults_to_a_new_folder_inside_the_run(run_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    result = run_cli(["export", "--help"], env={"COLUMNS": "200"})
    assert "[default: models/default]" not in " ".join(result.stdout.split())
    # The default is <run>/bundle: once a bundle is there, a second export refuses too.
    make_tiny_bundle(run_folder / "bundle", size=32)
    again = run_cli(["export", "--run", str(run_folder), "--data", str(data)])
    assert again.returncode == 2
    assert f"--out {run_folder / 'bundle'} already holds a bundle" in again.stderr


def test_export_refuses_a_folder_that_is_not_a_bundle_even_with_force(
    run_folder: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    result = run_cli(
        ["export", "--run", str(run_folder), "--data", str(data), "--out", str(precious), "--force"]
    )
    assert result.returncode == 2 and "is not a model bundle" in result.stderr
    assert (precious / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------ help at 80 columns


def option_names(command_name: str) -> list[str]:
    sub = load_command(command_name, COMMANDS[command_name])
    names = []
    for param in sub.params:
        if param.param_type_name == "option":
            names += [*param.opts, *param.secondary_opts]
    return names


@pytest.mark.parametrize("command_name", sorted(COMMANDS))
def test_help_at_80_columns_shows_every_option_name_whole(command_name: str) -> None:
    result = run_cli([command_name, "--help"], env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    names = option_names(command_name)
    assert len(names) >= 2
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.stdout), (
            f"{name} is not whole in `{command_name} --help`:\n{result.stdout}"
        )
    assert "…" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


# ------------------------------------------------------------------ packaging metadata


def test_licence_is_an_spdx_string_that_setuptools_does_not_warn_about() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str)
    # the string form needs setuptools 77 (PEP 639); older ones reject it
    floors = [
        int(m.group(1))
        for r in pyproject["build-system"]["requires"]
        if (m := re.fullmatch(r"setuptools>=(\d+)", r))
    ]
    assert floors and floors[0] >= 77


def test_an_image_without_training_code_lists_and_explains_its_commands(tmp_path: Path) -> None:
    """An install that leaves out the training/ and export/ packages (or their modules)."""
    listed = run_cli(["--help"], block=("training", "export"))
    assert listed.returncode == 0, listed.stderr
    assert "serve" in listed.stdout and "train" in listed.stdout
    result = run_cli(["train", "--data", str(tmp_path)], block=("training", "export"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: training is not installed; {extra_hint('train')}"
    ]


def test_readme_says_how_to_change_the_port_and_where_the_command_is() -> None:
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "make run PORT=8080" in readme and "PORT ?= 8000" in makefile
    assert re.search(r"^run:.*\n(\t.*\n)*\t.*--port \$\(PORT\)", makefile, re.MULTILINE)
    assert ".venv/bin/pneumoscreen" in readme and "source .venv/bin/activate" in readme
    assert extra_hint("train") in readme
    # `make export` rewrites the served bundle on purpose, so it must say --force
    assert re.search(r"^export:.*\n(\t.*\n)*\t.*--force", makefile, re.MULTILINE)

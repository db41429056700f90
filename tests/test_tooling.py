"""The project's habits, as configured: ruff's rule set, mypy --strict on service/, `make
check` before `make test`, the pre-commit hooks running the same ruff as constraints.txt."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ruff_selects_the_agreed_rule_families() -> None:
    lint = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"E", "W", "F", "I", "B", "UP", "BLE", "RUF"} <= set(lint["extend-select"])


def test_make_test_runs_make_check_first() -> None:
    dry = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "test"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = dry.splitlines()
    ruff = next(i for i, line in enumerate(lines) if "ruff check" in line)
    pytest_ = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert ruff < pytest_
    assert "pneumoscreen service training export tests bench" in lines[ruff]
    mypy = next(i for i, line in enumerate(lines) if line.endswith("/mypy"))
    assert ruff < mypy < pytest_
    formatter = next(i for i, line in enumerate(lines) if "ruff format --check" in line)
    assert "pneumoscreen service training export tests bench" in lines[formatter]
    assert formatter < pytest_


def test_mypy_is_strict_on_the_typed_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    mypy = pyproject["tool"]["mypy"]
    assert mypy["strict"] is True and mypy["files"] == ["service"]
    assert "pydantic.mypy" in mypy["plugins"]
    assert "ignore_missing_imports" not in mypy  # only per untyped third-party module
    assert (REPO / "service" / "py.typed").is_file()
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    assert any(dep.startswith("mypy") for dep in dev)
    assert re.search(r"^mypy==\S+$", (REPO / "constraints.txt").read_text(), re.MULTILINE)


def test_pre_commit_runs_the_pinned_ruff() -> None:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    ruff_repo = next(r for r in config["repos"] if r["repo"].endswith("ruff-pre-commit"))
    pinned = re.search(r"^ruff==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned and ruff_repo["rev"] == f"v{pinned.group(1)}"
    assert {"ruff-check", "ruff-format"} <= {hook["id"] for hook in ruff_repo["hooks"]}

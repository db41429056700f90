"""The direction of imports that docs/architecture.md draws, checked on every module's
import statements (ast, so lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"pneumoscreen", "service", "training", "export", "bench", "tests"}

# package -> the project packages it may import (besides itself); docs/architecture.md
ALLOWED = {
    "service": set(),
    "training": {"service"},
    "export": {"service", "training"},
    "pneumoscreen": set(),  # it names the others' modules as strings, imported on demand
    # bench/ drives the service the way the tests do: tests.support only (next test).
    "bench": {"service", "training", "export", "tests"},
}


def modules_imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_bench_imports_of_tests_are_the_support_package() -> None:
    wrong = {
        str(path.relative_to(REPO)): sorted(
            name
            for name in modules_imported(path)
            if name.split(".")[0] == "tests" and not name.startswith("tests.support.")
        )
        for path in sorted((REPO / "bench").rglob("*.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}, wrong


# Never in the service, even lazily: its install has no TensorFlow.
SERVICE_FORBIDDEN = {"tensorflow", "keras", "tf2onnx", "sklearn", "training", "export"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downwards(package: str) -> None:
    wrong = {}
    for path in sorted((REPO / package).rglob("*.py")):
        extra = (imported_roots(path) & OURS) - ALLOWED[package] - {package}
        if extra:
            wrong[str(path.relative_to(REPO))] = sorted(extra)
    assert not wrong, wrong


def test_the_service_never_imports_training_libraries() -> None:
    wrong = {
        str(p.relative_to(REPO)): sorted(imported_roots(p) & SERVICE_FORBIDDEN)
        for p in sorted((REPO / "service").rglob("*.py"))
        if imported_roots(p) & SERVICE_FORBIDDEN
    }
    assert not wrong, wrong


def test_the_edge_module_names_every_command_module_that_exists() -> None:
    from pneumoscreen.cli import COMMANDS

    for spec in COMMANDS.values():
        assert (REPO / (spec.module.replace(".", "/") + ".py")).is_file(), spec.module

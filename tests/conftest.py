"""Shared fixtures. The helpers they build on are the `tests.support` package
(tests/ is a package: pytest puts the repository root on sys.path for it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bundle_factory import make_tiny_bundle, make_tiny_gated_bundle
from tests.support.live_server import LiveServer, live_server

TESTS_DIR = Path(__file__).resolve().parent
FIXTURES = TESTS_DIR / "fixtures"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 64 px two-label (NORMAL/PNEUMONIA) bundle, threshold 0.5."""
    directory = tmp_path_factory.mktemp("tiny-bundle")
    make_tiny_bundle(directory, size=64)
    return directory


@pytest.fixture(scope="session")
def server(tiny_bundle: Path) -> Iterator[LiveServer]:
    """The real app under uvicorn on `tiny_bundle`, default settings, model loaded."""
    with live_server(tiny_bundle) as running:
        yield running


@pytest.fixture(scope="session")
def gated_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A format 2 bundle (64 px, features + cam outputs) whose gate was fitted on the
    fixture X-rays' features by the export's own code."""
    directory = tmp_path_factory.mktemp("gated-bundle")
    make_tiny_gated_bundle(directory, size=64)
    return directory


@pytest.fixture(scope="session")
def gated_server(gated_bundle: Path) -> Iterator[LiveServer]:
    with live_server(gated_bundle) as running:
        yield running

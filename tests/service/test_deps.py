"""service.deps: the routes read app.state only through the typed dependencies."""

from __future__ import annotations

import re
from pathlib import Path

from service.config import Settings
from service.main import create_app

REPO = Path(__file__).resolve().parents[2]
ROUTES = sorted((REPO / "service" / "routes").glob("*.py"))


def test_routes_do_not_read_app_state() -> None:
    assert ROUTES  # the glob found the route modules
    reads = [
        f"{path.name}:{number}: {line.strip()}"
        for path in ROUTES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bapp\s*\.\s*state\b", line)
    ]
    assert reads == [], "use service.deps instead:\n" + "\n".join(reads)


def test_dependencies_add_no_parameters_to_the_openapi_document(tmp_path: Path) -> None:
    document = create_app(Settings(model_dir=tmp_path)).openapi()
    names = {
        parameter["name"]
        for path in document["paths"].values()
        for operation in path.values()
        for parameter in operation.get("parameters", [])
    }
    assert "explain" in names  # the walk sees the routes' own parameters
    dependencies = {
        "request",
        "runner",
        "settings",
        "metrics",
        "registry",
        "lifecycle",
        "model",
        "limits",
    }
    assert names & dependencies == set()


def test_dependencies_run_on_the_event_loop() -> None:
    """FastAPI runs a plain `def` dependency in its thread pool: a hop there and back per
    dependency per request, for an attribute read. Every typed dependency is async."""
    import inspect
    import typing

    from service import deps

    annotated = {
        name: value
        for name, value in vars(deps).items()
        if name.endswith("Dep") and typing.get_origin(value) is typing.Annotated
    }
    assert len(annotated) >= 6  # RunnerDep, SettingsDep, MetricsDep, ...
    for name, alias in annotated.items():
        (marker,) = alias.__metadata__
        assert inspect.iscoroutinefunction(marker.dependency), name

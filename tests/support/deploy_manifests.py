"""Reading deploy/ as Kubernetes would, and the app as it really is, for tests/deploy.

- `render` runs `kubectl kustomize` (offline: it only reads files) and parses the result;
  tests that need it skip, with the reason, where kubectl is missing.
- `container_env` resolves a container's environment as the kubelet would: literal
  values, ConfigMap keys pulled in by `envFrom`, and `valueFrom` references.
- `app_routes`, `settings_names` and `drain_timeout` ask the service itself: its FastAPI
  app (service.main.create_app) and its Settings (service/config.py).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(path.parent for path in (K8S / "overlays").glob("*/kustomization.yaml"))
COMPONENTS = sorted(path.parent for path in (K8S / "components").glob("*/kustomization.yaml"))
TRAINING = K8S / "training"
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"

# The drain every helper agreed on (DRAIN_TIMEOUT_S, default 20 s), used only while
# service/config.py does not define the setting yet; once it does, its default is used.
AGREED_DRAIN_TIMEOUT_S = 20.0


def kubectl() -> str:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip(
            "kubectl is not installed: these tests render deploy/k8s with "
            "`kubectl kustomize` (built into kubectl 1.14+; needs kustomize v4+ "
            "for components, i.e. kubectl 1.21 or later)"
        )
    return binary


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize <directory>`: the objects an apply would send, parsed."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_with_components(
    tmp_path: Path, overlay: Path, *components: Path
) -> list[dict[str, Any]]:
    """An overlay plus components, as a site's own kustomization would combine them."""
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        "resources:",
        f"  - {os.path.relpath(overlay, tmp_path)}",
        "components:",
    ]
    lines += [f"  - {os.path.relpath(component, tmp_path)}" for component in components]
    (tmp_path / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return render(tmp_path)


def kserve_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KSERVE.read_text()) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj.get("kind") == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    for candidate in pod_spec["containers"]:
        if candidate["name"] == name:
            return candidate
    raise AssertionError(f"no container {name!r} in {[c['name'] for c in pod_spec['containers']]}")


# ----------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class EnvValue:
    """One environment variable of a container: a literal or where it comes from."""

    value: str | None = None
    source: dict[str, Any] | None = None  # the valueFrom mapping
    config_map: str | None = None  # the ConfigMap an envFrom took it from


def container_env(ctr: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, EnvValue]:
    """Name -> value as the kubelet resolves it: envFrom first, then env (env wins)."""
    config_maps = {
        cm["metadata"]["name"]: cm.get("data") or {} for cm in of_kind(objects, "ConfigMap")
    }
    env: dict[str, EnvValue] = {}
    for source in ctr.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"envFrom other than a ConfigMap: {source}"
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"envFrom names ConfigMap {name!r}, which is not rendered"
        for key, value in config_maps[name].items():
            env[key] = EnvValue(value=str(value), config_map=name)
    for item in ctr.get("env", []):
        if "valueFrom" in item:
            env[item["name"]] = EnvValue(source=item["valueFrom"])
        else:
            env[item["name"]] = EnvValue(value=str(item.get("value", "")))
    return env


def literal_env(env: dict[str, EnvValue]) -> dict[str, str]:
    return {name: item.value for name, item in env.items() if item.value is not None}


# ----------------------------------------------------------------------------- the app


def settings_names() -> set[str]:
    """Every environment variable the service reads: Settings' fields, upper case."""
    from service.config import Settings

    return {name.upper() for name in Settings.model_fields}


def validated_settings(literals: dict[str, str]) -> Any:
    """Settings built from a manifest's literal values: pydantic checks each one."""
    from service.config import Settings

    return Settings(**{name.lower(): value for name, value in literals.items()})


def app_serves_get(paths: set[str]) -> dict[str, bool]:
    """Whether the real FastAPI app (service.main.create_app; no model loaded) routes a GET
    of each path to a handler: Starlette's own matching, as when it serves a request."""
    from starlette.routing import Match

    from service.config import Settings
    from service.main import create_app

    app = create_app(Settings())

    def served(path: str) -> bool:
        scope = {
            "type": "http",
            "method": "GET",
            "path": path,
            "root_path": "",
            "headers": [],
            "query_string": b"",
        }
        return any(route.matches(scope)[0] == Match.FULL for route in app.routes)

    return {path: served(path) for path in paths}


def app_get_routes() -> list[str]:
    """The GET paths of the app's OpenAPI schema (for messages: what it does serve)."""
    from service.config import Settings
    from service.main import create_app

    schema = create_app(Settings()).openapi()
    return sorted(path for path, operations in schema["paths"].items() if "get" in operations)


def assert_probes_served(paths: dict[str, str], base_url: str) -> None:
    """Every probe path is a GET route of the app, and a loaded server answers it 200."""
    import httpx

    served = app_serves_get(set(paths.values()))
    for kind, path in paths.items():
        assert served[path], f"{kind} {path} is not a GET route of the app: {app_get_routes()}"
        response = httpx.get(f"{base_url}{path}", timeout=10)
        assert response.status_code == 200, f"{kind} {path}: {response.status_code}"


def drain_timeout(literals: dict[str, str]) -> tuple[float, str]:
    """The drain the pod gets after SIGTERM, and where that figure comes from."""
    from service.config import Settings

    if "DRAIN_TIMEOUT_S" in literals:
        return float(literals["DRAIN_TIMEOUT_S"]), "DRAIN_TIMEOUT_S set in the manifest"
    field = Settings.model_fields.get("drain_timeout_s")
    if field is not None:
        return float(
            field.get_default(call_default_factory=True)
        ), "the default of Settings.drain_timeout_s"
    return AGREED_DRAIN_TIMEOUT_S, (
        "the agreed DRAIN_TIMEOUT_S default (service/config.py has no drain_timeout_s yet)"
    )


# ----------------------------------------------------------------------------- pods


def cpu_cores(quantity: str | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def intra_op_threads_matches_cpu_limit(ctr: dict[str, Any], env: dict[str, EnvValue]) -> str:
    """'' when INTRA_OP_THREADS is the container's CPU limit, else what is wrong."""
    limit = ctr.get("resources", {}).get("limits", {}).get("cpu")
    if limit is None:
        return "the container has no CPU limit"
    item = env.get("INTRA_OP_THREADS")
    if item is None:
        return "INTRA_OP_THREADS is not set (onnxruntime would size its pool from the node)"
    if item.source is not None:
        field = item.source.get("resourceFieldRef") or {}
        if (
            field.get("containerName", ctr["name"]) == ctr["name"]
            and field.get("resource") == "limits.cpu"
            and str(field.get("divisor", "1")) == "1"
        ):
            return ""
        return f"INTRA_OP_THREADS comes from {item.source}, not this container's limits.cpu"
    if item.value is not None and int(item.value) == math.ceil(cpu_cores(limit)):
        return ""
    return f"INTRA_OP_THREADS={item.value} but the CPU limit is {limit}"


def named_port(ctr: dict[str, Any], port: str | int) -> int:
    """A probe's or Service's port (a name or a number) as the container's port number."""
    numbers = {p["containerPort"] for p in ctr.get("ports", [])}
    if isinstance(port, int):
        assert port in numbers, f"port {port} is not one the container declares ({numbers})"
        return port
    for declared in ctr.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"no container port named {port!r}")


def prestop_sleep_s(ctr: dict[str, Any]) -> float:
    """Seconds a `sleep N` preStop hook holds the container before SIGTERM (0 without)."""
    hook = ctr.get("lifecycle", {}).get("preStop")
    if not hook:
        return 0.0
    if "sleep" in hook:  # the native sleep action (Kubernetes 1.29+)
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    assert command[:1] == ["sleep"] and len(command) == 2, f"unexpected preStop hook {hook}"
    return float(command[1])


def mounts(ctr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["mountPath"]: mount for mount in ctr.get("volumeMounts", [])}


def checkov() -> str:
    """checkov lives in its own venv (.venv-scan, `make scan-venv`): see pyproject's scan
    extra. CHECKOV names another binary; PATH is the last resort."""
    candidates = [
        os.environ.get("CHECKOV"),
        str(REPO / ".venv-scan" / "bin" / "checkov"),
        shutil.which("checkov"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(
        "checkov is not installed: `make scan-venv` creates .venv-scan with it "
        "(pinned by constraints-scan.txt); `make test` does so too"
    )

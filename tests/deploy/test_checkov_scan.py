"""checkov (from PyPI: the `scan` extra, in its own venv) over what a cluster would run:
every overlay and the training Job as `kubectl kustomize` renders them, the pod KServe
builds from deploy/kserve, and both Dockerfiles. Every failed check is fixed; the few
accepted ones are skipped in place (an annotation in a manifest, a `# checkov:skip=`
comment in a Dockerfile) with the reason beside them, and this test reads those reasons
back from checkov's own report."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy_manifests import (
    OVERLAYS,
    REPO,
    TRAINING,
    checkov,
    kserve_documents,
    one,
    render,
)

DOCKERFILES = (REPO / "Dockerfile.api", REPO / "Dockerfile.train")
# Fields of KServe's predictor that are not pod fields (replicas, scaling, the model).
KSERVE_NON_POD_FIELDS = {
    "model",
    "minReplicas",
    "maxReplicas",
    "scaleMetric",
    "scaleTarget",
    "scaleMetricType",
    "autoScaling",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
}


def kserve_pod_objects() -> list[dict[str, Any]]:
    """The Deployment KServe (RawDeployment) makes of the runtime and the predictor: the
    runtime's container and volumes in the predictor's pod fields, with the runtime's
    accepted findings; plus the file's own PodDisruptionBudget and NetworkPolicy."""
    documents = kserve_documents()
    runtime, isvc = one(documents, "ServingRuntime"), one(documents, "InferenceService")
    pod = {
        key: value
        for key, value in isvc["spec"]["predictor"].items()
        if key not in KSERVE_NON_POD_FIELDS
    }
    pod["containers"] = runtime["spec"]["containers"]
    pod["volumes"] = runtime["spec"].get("volumes", [])
    labels = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    skips = {
        key: value
        for key, value in runtime["metadata"].get("annotations", {}).items()
        if key.startswith("checkov.io/skip")
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"{isvc['metadata']['name']}-predictor",
            "namespace": isvc["metadata"]["namespace"],
            "annotations": skips,
        },
        "spec": {
            "replicas": isvc["spec"]["predictor"]["minReplicas"],
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    others = [doc for doc in documents if doc["kind"] in ("PodDisruptionBudget", "NetworkPolicy")]
    return [deployment, *others]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    binary = checkov()
    folder = tmp_path_factory.mktemp("rendered")
    sources = {f"overlay-{path.name}.yaml": render(path) for path in OVERLAYS}
    sources["training.yaml"] = render(TRAINING)
    sources["kserve-predictor.yaml"] = kserve_pod_objects()
    files = []
    for name, objects in sources.items():
        (folder / name).write_text(yaml.safe_dump_all(objects, sort_keys=False))
        files.append(folder / name)
    args = [
        binary,
        "--framework",
        "kubernetes",
        "dockerfile",
        "--output",
        "json",
        "--skip-download",
    ]
    for path in [*files, *DOCKERFILES]:
        args += ["--file", str(path)]
    # Offline: no policy download, no look-up of a newer checkov on PyPI.
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"}
    env.pop("BC_API_KEY", None)
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.stdout.strip(), (
        f"checkov printed nothing (exit {result.returncode}):\n{result.stderr[-3000:]}"
    )
    parsed = json.loads(result.stdout)
    reports = parsed if isinstance(parsed, list) else [parsed]
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, f"checkov ran {set(by_type)}"
    return {"reports": by_type, "files": [*files, *DOCKERFILES], "exit": result.returncode}


def _checks(report: dict[str, Any], outcome: str) -> list[dict[str, Any]]:
    return [check for r in report["reports"].values() for check in r["results"][outcome]]


def test_no_failed_checks(report: dict[str, Any]) -> None:
    failed = [
        f"{c['check_id']} {c['check_name']!r} on {c['resource']} ({c['file_path']})"
        for c in _checks(report, "failed_checks")
    ]
    assert not failed, "checkov findings to fix or skip with a reason:\n" + "\n".join(failed)
    assert report["exit"] == 0
    for r in report["reports"].values():
        assert not r["results"]["parsing_errors"], r["results"]["parsing_errors"]


def test_every_file_was_really_scanned(report: dict[str, Any]) -> None:
    """An unparsed file passes every check vacuously: each one must show passed checks on
    its pod or image."""
    scanned: dict[str, set[str]] = {}
    for check in _checks(report, "passed_checks"):
        scanned.setdefault(Path(check["file_path"]).name, set()).add(check["resource"])
    for path in report["files"]:
        resources = scanned.get(path.name, set())
        if path.suffix == ".yaml":
            assert any(r.startswith(("Deployment.", "Job.")) for r in resources), (
                f"{path.name}: no check ran on its Deployment or Job ({sorted(resources)})"
            )
        else:
            assert resources, f"{path.name}: no Dockerfile check ran"


def test_every_skip_carries_its_reason(report: dict[str, Any]) -> None:
    skipped = _checks(report, "skipped_checks")
    assert skipped, "no accepted finding at all: then drop this test's reason-checking"
    for check in skipped:
        reason = (check["check_result"].get("suppress_comment") or "").strip()
        assert len(reason.split()) >= 6, (
            f"{check['check_id']} on {check['resource']} is skipped without a real reason: "
            f"{reason!r}"
        )


def test_dockerfile_skip_of_the_base_image_tag_check_is_true() -> None:
    """CKV_DOCKER_7 is skipped because checkov cannot read a tag through a build argument:
    every FROM is such an argument whose default has a version tag, or an earlier stage."""
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "checkov:skip=CKV_DOCKER_7" in text
        defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
        stages: set[str] = set()
        for base, name in re.findall(r"^FROM (\S+) AS (\S+)$", text, re.MULTILINE):
            if base in stages:
                stages.add(name)
                continue
            argument = re.fullmatch(r"\$\{(\w+)\}", base)
            assert argument, f"{dockerfile.name}: FROM {base} is neither an ARG nor a stage"
            image = defaults[argument.group(1)]
            tag = image.rpartition(":")[2] if ":" in image else ""
            assert tag and tag != "latest" and re.search(r"\d", tag), f"{image}: no version tag"
            stages.add(name)

"""deploy/k8s/training: the training Job, rendered with `kubectl kustomize`, checked against
Dockerfile.train (image target, user, volumes) and its entry point (the environment it
reads, `DISTRIBUTE` passed on to `pneumoscreen train --distribute`)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy_manifests import (
    REPO,
    TRAINING,
    container,
    container_env,
    literal_env,
    mounts,
    of_kind,
    one,
    render,
)
from training.distribute import DISTRIBUTE_CHOICES

DOCKERFILE_TRAIN = REPO / "Dockerfile.train"
ENTRYPOINT = REPO / "training" / "docker-entrypoint.sh"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(TRAINING)


def job_pod(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    job = one(objects, "Job")
    pod = job["spec"]["template"]["spec"]
    return pod, container(pod, "train")


def entrypoint_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", ENTRYPOINT.read_text()))


def test_job_runs_the_gpu_training_image_on_a_gpu(rendered: list[dict[str, Any]]) -> None:
    assert {obj["kind"] for obj in rendered} == {
        "Job",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "NetworkPolicy",
    }
    pod, train = job_pod(rendered)
    assert train["image"].split(":")[0] == "pneumoscreen-train"
    assert train["image"].endswith("-gpu"), "the Job asks for a GPU: it runs train-gpu"
    assert re.search(r"^FROM \S+ AS train-gpu$", DOCKERFILE_TRAIN.read_text(), re.MULTILINE)
    limits, requests = train["resources"]["limits"], train["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and requests == limits
    assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    job = one(rendered, "Job")["spec"]
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0


def test_env_is_what_the_entrypoint_reads(rendered: list[dict[str, Any]]) -> None:
    _, train = job_pod(rendered)
    env = literal_env(container_env(train, rendered))
    unknown = set(env) - entrypoint_variables()
    assert not unknown, f"the Job sets {sorted(unknown)}, which {ENTRYPOINT.name} never reads"
    assert env["DISTRIBUTE"] in DISTRIBUTE_CHOICES
    weights = env.get("WEIGHTS", "imagenet")
    if weights not in ("imagenet", "none"):
        assert any(Path(weights).is_relative_to(path) for path in mounts(train)), weights


def test_volumes_are_the_images(rendered: list[dict[str, Any]]) -> None:
    pod, train = job_pod(rendered)
    dockerfile = DOCKERFILE_TRAIN.read_text()
    claims = {pvc["metadata"]["name"] for pvc in of_kind(rendered, "PersistentVolumeClaim")}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    by_path = mounts(train)
    for path, writable in (("/data", False), ("/models", True), ("/runs", True)):
        assert f" {path}" in dockerfile, f"Dockerfile.train does not create {path}"
        mount = by_path[path]
        assert bool(mount.get("readOnly")) is not writable, path
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] in claims
        assert bool(claim.get("readOnly")) is not writable, path
    bundle_dir = Path(literal_env(container_env(train, rendered))["BUNDLE_DIR"])
    assert bundle_dir.is_relative_to("/models")
    # HOME=/tmp in the image (Keras cache): writable despite the read-only root.
    assert "HOME=/tmp" in dockerfile
    assert train["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[by_path["/tmp"]["name"]]


def test_job_runs_as_the_images_user(rendered: list[dict[str, Any]]) -> None:
    pod, train = job_pod(rendered)
    [user] = set(re.findall(r"^USER (\d+):(\d+)$", DOCKERFILE_TRAIN.read_text(), re.MULTILINE))
    context = pod["securityContext"]
    assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user
    assert context["runAsNonRoot"] is True and context["fsGroup"] == int(user[1])
    assert pod["automountServiceAccountToken"] is False
    assert train["securityContext"]["allowPrivilegeEscalation"] is False
    assert train["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_gpu_image_installs_the_pinned_tensorflow_release() -> None:
    pinned = re.search(
        r"^tensorflow_cpu==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE
    )
    declared = re.search(
        r"^ARG TENSORFLOW_VERSION=(\S+)$", DOCKERFILE_TRAIN.read_text(), re.MULTILINE
    )
    assert pinned and declared and pinned.group(1) == declared.group(1), (
        "Dockerfile.train's TENSORFLOW_VERSION must be the tensorflow_cpu pin of constraints.txt"
    )
    assert '"tensorflow[and-cuda]==${TENSORFLOW_VERSION}"' in DOCKERFILE_TRAIN.read_text()


def _entrypoint_env(tmp_path: Path, bundle: Path) -> tuple[dict[str, str], Path]:
    """The entry script's environment, with a stand-in `pneumoscreen` first on PATH that
    records its calls (one line each) in the returned file."""
    (tmp_path / "data" / "train").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "pneumoscreen"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "DATA_DIR": str(tmp_path / "data"),
        "WEIGHTS": "none",
        "RUN_DIR": str(tmp_path / "run"),
        "BUNDLE_DIR": str(bundle),
        "CACHE_DIR": str(tmp_path / "cache"),
    }
    return env, calls


def test_entrypoint_passes_distribute_to_train(tmp_path: Path) -> None:
    """The real entry script, with a stand-in `pneumoscreen` on PATH recording its calls."""
    env, calls = _entrypoint_env(tmp_path, tmp_path / "b")
    env["DISTRIBUTE"] = "mirrored"
    result = subprocess.run(
        ["bash", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    train_call, export_call = calls.read_text().splitlines()
    assert train_call.startswith("train ") and "--distribute mirrored" in train_call
    assert export_call.startswith("export ") and "--distribute" not in export_call

    del env["DISTRIBUTE"]
    calls.unlink()
    subprocess.run(["bash", str(ENTRYPOINT)], env=env, capture_output=True, timeout=30, check=True)
    assert "--distribute" not in calls.read_text()


def test_entrypoint_refuses_an_existing_bundle_before_training(tmp_path: Path) -> None:
    """export would refuse it after the training; the entry point says so before it."""
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "model.json").write_text("{}")
    env, calls = _entrypoint_env(tmp_path, bundle)
    refused = subprocess.run(
        ["bash", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert refused.returncode == 2 and "EXPORT_ARGS=--force" in refused.stderr
    assert not calls.exists()

    forced = subprocess.run(
        ["bash", str(ENTRYPOINT)],
        env={**env, "EXPORT_ARGS": "--force"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert forced.returncode == 0, forced.stderr
    train_call, export_call = calls.read_text().splitlines()
    assert train_call.startswith("train ")
    assert export_call.startswith("export ") and export_call.endswith("--force")

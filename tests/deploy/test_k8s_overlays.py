"""deploy/k8s: every overlay rendered with `kubectl kustomize` (offline), and the rendered
objects checked against the app itself: probe paths are routes it serves (and answer 200
over real HTTP once the model is loaded), every environment name is one of its settings,
the container port is the one it listens on, the termination grace period covers its
drain. Then the high-availability and security settings the overlays promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy_manifests import (
    COMPONENTS,
    K8S,
    OVERLAYS,
    REPO,
    TRAINING,
    assert_probes_served,
    container,
    container_env,
    drain_timeout,
    intra_op_threads_matches_cpu_limit,
    literal_env,
    mounts,
    named_port,
    of_kind,
    one,
    prestop_sleep_s,
    render,
    render_with_components,
    settings_names,
    validated_settings,
)
from tests.support.live_server import LiveServer

API_CONTAINER = "api"


@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda path: path.name)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def api_pod(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    return pod, container(pod, API_CONTAINER)


def test_overlays_exist() -> None:
    assert {path.name for path in OVERLAYS} == {"cpu", "gpu"}
    assert {path.name for path in COMPONENTS} == {"site-bundle", "openshift"}


def test_overlay_renders_every_object_of_the_base(rendered: list[dict[str, Any]]) -> None:
    kinds = {obj["kind"] for obj in rendered}
    assert kinds == {
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }
    # The API key is referenced, never shipped: no Secret object, no key in the settings.
    assert not of_kind(rendered, "Secret")
    for obj in rendered:
        assert obj["metadata"].get("namespace") not in (None, "", "default"), obj["metadata"]


def test_probes_are_routes_the_app_serves(
    rendered: list[dict[str, Any]], server: LiveServer
) -> None:
    _, api = api_pod(rendered)
    paths = {
        kind: api[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    # Readiness (and start-up) on the route that is 503 until the model is loaded;
    # liveness on the one that answers as soon as the process does.
    assert paths == {
        "startupProbe": "/health",
        "readinessProbe": "/health",
        "livenessProbe": "/livez",
    }
    assert_probes_served(paths, server.base_url)


def test_every_env_name_is_a_setting_of_the_app(rendered: list[dict[str, Any]]) -> None:
    _, api = api_pod(rendered)
    env = container_env(api, rendered)
    unknown = set(env) - settings_names()
    assert not unknown, f"the pod sets {sorted(unknown)}, which service/config.py never reads"
    # pydantic validates every literal value as the app would at start-up.
    validated_settings(literal_env(env))
    api_key = env["API_KEY"]
    assert api_key.value is None and "secretKeyRef" in (api_key.source or {})
    assert "optional" not in api_key.source["secretKeyRef"], "the key must not be optional"
    problem = intra_op_threads_matches_cpu_limit(api, env)
    assert not problem, problem


def test_container_port_is_the_one_the_app_listens_on(rendered: list[dict[str, Any]]) -> None:
    from service.config import Settings

    _, api = api_pod(rendered)
    literals = literal_env(container_env(api, rendered))
    port = int(literals.get("PORT", Settings.model_fields["port"].default))
    assert literals.get("HOST") == "0.0.0.0", "the app binds 127.0.0.1 unless HOST is set"
    [declared] = api["ports"]
    assert declared["containerPort"] == port and declared.get("protocol", "TCP") == "TCP"
    assert f"EXPOSE {port}" in (REPO / "Dockerfile.api").read_text()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert named_port(api, api[kind]["httpGet"]["port"]) == port, kind
    [service_port] = one(rendered, "Service")["spec"]["ports"]
    assert named_port(api, service_port["targetPort"]) == port
    [rule] = one(rendered, "NetworkPolicy")["spec"]["ingress"]
    [allowed] = rule["ports"]
    assert named_port(api, allowed["port"]) == port and allowed["protocol"] == "TCP"


def test_termination_grace_period_exceeds_the_drain(rendered: list[dict[str, Any]]) -> None:
    pod, api = api_pod(rendered)
    drain, source = drain_timeout(literal_env(container_env(api, rendered)))
    grace = pod["terminationGracePeriodSeconds"]
    hold = prestop_sleep_s(api)
    # The preStop hook runs inside the grace period, before SIGTERM starts the drain.
    assert grace > hold + drain, (
        f"terminationGracePeriodSeconds {grace} <= preStop {hold} s + drain {drain} s "
        f"({source}): the kubelet would kill requests still being answered"
    )


def test_pod_is_locked_down(rendered: list[dict[str, Any]]) -> None:
    pod, api = api_pod(rendered)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    account = one(rendered, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
    context = api["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    # Uploads over 1 MB spool to the temporary directory: writable despite the read-only root.
    tmp = mounts(api)["/tmp"]
    assert not tmp.get("readOnly")
    [volume] = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume


def test_replicas_rollout_disruptions_and_autoscaling(rendered: list[dict[str, Any]]) -> None:
    deployment = one(rendered, "Deployment")
    spec = deployment["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "rollouts never drop a pod"

    hpa = one(rendered, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    [metric] = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    _, api = api_pod(rendered)
    assert "cpu" in api["resources"]["requests"], "CPU utilisation is relative to the request"

    pdb = one(rendered, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= pdb["minAvailable"] < hpa["minReplicas"], "drains must still be possible"

    service = one(rendered, "Service")["spec"]
    assert service["selector"].items() <= pod_labels.items()
    policy = one(rendered, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []
    [rule] = policy["ingress"]
    assert set(rule) == {"ports"} and len(rule["ports"]) == 1


def test_resources_are_guaranteed(rendered: list[dict[str, Any]]) -> None:
    _, api = api_pod(rendered)
    requests, limits = api["resources"]["requests"], api["resources"]["limits"]
    for resource in ("cpu", "memory"):
        assert requests[resource] == limits[resource], f"{resource}: request != limit"


def test_cpu_and_gpu_overlays_differ_where_they_should() -> None:
    cpu, gpu = render(K8S / "overlays" / "cpu"), render(K8S / "overlays" / "gpu")
    (_, cpu_api), (gpu_pod, gpu_api) = api_pod(cpu), api_pod(gpu)
    assert "nvidia.com/gpu" not in cpu_api["resources"]["limits"]
    assert str(gpu_api["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert literal_env(container_env(cpu_api, cpu))["PROVIDERS"] == "cpu"
    assert literal_env(container_env(gpu_api, gpu))["PROVIDERS"] == "cuda"
    # Images: the api target for CPU, api-gpu (onnxruntime-gpu) for the GPU overlay.
    assert not cpu_api["image"].endswith("-gpu") and gpu_api["image"].endswith("-gpu")
    assert "AS api-gpu" in (REPO / "Dockerfile.api").read_text()
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod.get("tolerations", []))


def test_site_bundle_component_serves_the_training_volume(tmp_path: Path) -> None:
    site = render_with_components(
        tmp_path, K8S / "overlays" / "cpu", K8S / "components" / "site-bundle"
    )
    pod, api = api_pod(site)
    model_dir = Path(literal_env(container_env(api, site))["MODEL_DIR"])
    [(mount_path, mount)] = [
        (Path(path), m)
        for path, m in mounts(api).items()
        if model_dir.is_relative_to(path) and path != "/"
    ]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]

    # The same claim and folder the training Job writes its bundle to.
    training = render(TRAINING)
    job_pod = one(training, "Job")["spec"]["template"]["spec"]
    train = container(job_pod, "train")
    bundle_dir = Path(literal_env(container_env(train, training))["BUNDLE_DIR"])
    [(job_mount_path, job_mount)] = [
        (Path(path), m)
        for path, m in mounts(train).items()
        if bundle_dir.is_relative_to(path) and path != "/"
    ]
    [job_volume] = [v for v in job_pod["volumes"] if v["name"] == job_mount["name"]]
    assert job_volume["persistentVolumeClaim"]["claimName"] == claim
    assert claim in {pvc["metadata"]["name"] for pvc in of_kind(training, "PersistentVolumeClaim")}
    assert bundle_dir.relative_to(job_mount_path) == model_dir.relative_to(mount_path)


def test_openshift_component_leaves_the_uid_to_openshift(tmp_path: Path) -> None:
    objects = render_with_components(
        tmp_path, K8S / "overlays" / "cpu", K8S / "components" / "openshift"
    )
    pod, _ = api_pod(objects)
    context = pod["securityContext"]
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context)
    assert context["runAsNonRoot"] is True

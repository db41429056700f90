"""deploy/kserve/inferenceservice.yaml: our image as a KServe ServingRuntime on the Open
Inference Protocol v2, checked against the app (routes, settings, port, drain) and against
deploy/k8s/base (the same resources, probe timings, replicas and pod security).

Its probes are the OIP v2 health routes. Until the app serves any /v2 route (the
standards work), the probe-route test is an expected failure, with that reason; as soon as
one exists it runs for real and must pass."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.support.deploy_manifests import (
    K8S,
    assert_probes_served,
    container,
    container_env,
    drain_timeout,
    intra_op_threads_matches_cpu_limit,
    kserve_documents,
    literal_env,
    mounts,
    named_port,
    one,
    prestop_sleep_s,
    settings_names,
    validated_settings,
)
from tests.support.live_server import LiveServer

KSERVE_CONTAINER = "kserve-container"  # the predictor container's name in KServe
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    return kserve_documents()


def runtime_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return container(one(documents, "ServingRuntime")["spec"], KSERVE_CONTAINER)


def predictor(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return one(documents, "InferenceService")["spec"]["predictor"]


def base_api() -> tuple[dict[str, Any], dict[str, Any]]:
    """deploy/k8s/base's pod spec and API container, read as written (no kubectl needed)."""
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    return pod, container(pod, "api")


def test_runtime_and_service_speak_open_inference_protocol_v2(
    documents: list[dict[str, Any]],
) -> None:
    assert {doc["kind"] for doc in documents} == {
        "ServingRuntime",
        "InferenceService",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    runtime = one(documents, "ServingRuntime")
    isvc = one(documents, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert "storageUri" not in model, "the bundle is baked into the image"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    namespaces = {doc["metadata"]["namespace"] for doc in documents}
    assert len(namespaces) == 1 and namespaces != {"default"}


def test_probes_are_the_oip_health_routes_of_the_app(
    documents: list[dict[str, Any]], server: LiveServer
) -> None:
    api = runtime_container(documents)
    paths = {kind: api[kind]["httpGet"]["path"] for kind in PROBES}
    assert paths == {
        "startupProbe": "/v2/health/ready",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }
    assert_probes_served(paths, server.base_url)


def test_env_port_and_threads_are_the_apps(documents: list[dict[str, Any]]) -> None:
    api = runtime_container(documents)
    env = container_env(api, documents)
    unknown = set(env) - settings_names()
    assert not unknown, f"the predictor sets {sorted(unknown)}, which service/config.py never reads"
    literals = literal_env(env)
    validated_settings(literals)
    assert env["API_KEY"].source and "secretKeyRef" in env["API_KEY"].source
    problem = intra_op_threads_matches_cpu_limit(api, env)
    assert not problem, problem
    port = int(literals["PORT"])
    assert literals["HOST"] == "0.0.0.0"
    # KServe's Service targets the container's first port.
    assert api["ports"][0]["containerPort"] == port
    for kind in PROBES:
        assert named_port(api, api[kind]["httpGet"]["port"]) == port
    [rule] = one(documents, "NetworkPolicy")["spec"]["ingress"]
    [allowed] = rule["ports"]
    assert named_port(api, allowed["port"]) == port


def test_same_resources_probe_timings_and_security_as_the_base(
    documents: list[dict[str, Any]],
) -> None:
    base_pod, base = base_api()
    api = runtime_container(documents)
    assert api["image"].split(":")[0] == base["image"].split(":")[0]
    assert api["resources"] == base["resources"]
    for kind in PROBES:
        timing = {k: v for k, v in api[kind].items() if k != "httpGet"}
        assert timing == {k: v for k, v in base[kind].items() if k != "httpGet"}, kind
    assert api["securityContext"] == base["securityContext"]
    assert api["lifecycle"] == base["lifecycle"]
    assert not mounts(api)["/tmp"].get("readOnly")
    assert "/tmp" in mounts(base)

    spec = predictor(documents)
    for key in (
        "securityContext",
        "automountServiceAccountToken",
        "enableServiceLinks",
        "terminationGracePeriodSeconds",
    ):
        assert spec[key] == base_pod[key], key
    hpa = yaml.safe_load((K8S / "base" / "horizontalpodautoscaler.yaml").read_text())["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    assert spec["scaleMetric"] == hpa["metrics"][0]["resource"]["name"]
    assert spec["scaleTarget"] == hpa["metrics"][0]["resource"]["target"]["averageUtilization"]


def test_termination_grace_period_exceeds_the_drain(documents: list[dict[str, Any]]) -> None:
    api = runtime_container(documents)
    drain, source = drain_timeout(literal_env(container_env(api, documents)))
    grace = predictor(documents)["terminationGracePeriodSeconds"]
    hold = prestop_sleep_s(api)
    assert grace > hold + drain, (
        f"terminationGracePeriodSeconds {grace} <= preStop {hold} s + drain {drain} s ({source})"
    )


def test_disruption_budget_and_network_policy_select_the_predictor_pods(
    documents: list[dict[str, Any]],
) -> None:
    # KServe labels every predictor pod with the InferenceService's name.
    name = one(documents, "InferenceService")["metadata"]["name"]
    selector = {"serving.kserve.io/inferenceservice": name}
    assert one(documents, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    policy = one(documents, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == selector
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []
    assert (
        one(documents, "PodDisruptionBudget")["spec"]["minAvailable"]
        < predictor(documents)["minReplicas"]
    )

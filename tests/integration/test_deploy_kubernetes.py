"""The Kubernetes manifests: they parse, the Deployment drains within its grace period, probes /health and
asks for a GPU, and the Service and PodMonitor reach the metrics port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tests.integration.deploy_support import (
    BYOC_JOB,
    PROMETHEUS_CONFIG,
    byoc_container,
    dockerfile_env,
    drain_timeout_s,
    kubernetes_documents,
    kubernetes_object,
    load_yaml,
    secret_values,
)

# --- Kubernetes --------------------------------------------------------------------------------


def _container_port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert port in named, f"no container port named {port!r}"
    return int(named[port])


def test_kubernetes_manifests_parse() -> None:
    kinds = sorted(doc["kind"] for doc in kubernetes_documents())
    assert kinds == ["Deployment", "PodMonitor", "Service"]
    for doc in kubernetes_documents():
        assert doc["apiVersion"]
        assert doc["metadata"]["name"]


def test_kubernetes_deployment_drains_probes_and_asks_for_a_gpu() -> None:
    deployment = kubernetes_object("Deployment")
    pod = deployment["spec"]["template"]
    container = byoc_container()
    env = {item["name"]: item for item in container["env"]}
    values = {name: str(item["value"]) for name, item in env.items() if "value" in item}
    drain = drain_timeout_s(values)
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain

    port = int(values.get("BYOC_PORT", dockerfile_env()["BYOC_PORT"]))
    assert port == 8000
    assert port in [p["containerPort"] for p in container["ports"]]
    for probe_name in ("livenessProbe", "readinessProbe"):
        probe = container[probe_name]
        assert probe["httpGet"]["path"] == "/health", probe_name
        assert _container_port(container, probe["httpGet"]["port"]) == port, probe_name
    # A drain never makes liveness restart the pod, and a long model load gets minutes.
    liveness = container["livenessProbe"]
    assert liveness["failureThreshold"] * liveness.get("periodSeconds", 10) > drain
    startup = container.get("startupProbe")
    load_budget = liveness.get("initialDelaySeconds", 0)
    if startup:
        assert startup["httpGet"]["path"] == "/health"
        load_budget = max(load_budget, startup["failureThreshold"] * startup.get("periodSeconds", 10))
    assert load_budget >= 300

    resources = container["resources"]
    assert str(resources["requests"]["nvidia.com/gpu"]) == "1"
    secret = env["BYOC_ORCH_SECRET"]
    assert "value" not in secret
    assert secret["valueFrom"]["secretKeyRef"]["name"]
    assert not secret_values(values), "a secret is written into the Deployment"

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    if pod["spec"].get("securityContext", {}).get("runAsUser") is not None:
        assert pod["spec"]["securityContext"]["runAsUser"] != 0


def test_kubernetes_service_and_podmonitor_reach_the_metrics_port() -> None:
    pod = kubernetes_object("Deployment")["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = byoc_container()

    service_spec = kubernetes_object("Service")["spec"]
    assert service_spec["selector"].items() <= pod_labels.items()
    assert any(_container_port(container, p["targetPort"]) == 8000 for p in service_spec["ports"])

    monitor = kubernetes_object("PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    endpoints = monitor["podMetricsEndpoints"]
    assert any(
        _container_port(container, e["port"]) == 8000 and e.get("path", "/metrics") == "/metrics"
        for e in endpoints
    )
    # the job label is "byoc", as in prometheus.yml, so rules.yml applies unchanged
    assert pod_labels[monitor["jobLabel"]] == BYOC_JOB
    assert BYOC_JOB in {job["job_name"] for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}

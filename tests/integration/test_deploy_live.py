"""The deployment against a live ``byoc serve``, started here with the compose stack's own byoc settings
against a fake orchestrator: it exports every metric a dashboard panel or an alert names, those settings
register the capability, and SIGTERM drains within the stop grace period.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.serve import ServeProcess
from tests.integration.deploy_support import (
    BYOC_JOB,
    EXAMPLE_ENV,
    ORCHESTRATOR_JOB,
    ROOT,
    compose_env_for,
    dashboard_queries,
    drain_timeout_s,
    duration_s,
    exported_names,
    promql_selectors,
    read_env_file,
    rule_queries,
    service,
)
from tests.support import FakeOrchestrator, serve_app

# --- a live byoc serve, configured like the compose stack's byoc service -------------------------


@dataclass
class LiveServe:
    env: dict[str, str]
    metrics: str = ""
    health_status: int = 0
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    exit_code: int | None = None
    drain_s: float = 0.0
    log: str = ""


async def _run_live_serve(live: LiveServe) -> None:
    fake = FakeOrchestrator(live.env["BYOC_ORCH_SECRET"])
    async with serve_app(fake.app()) as url:
        env = {**live.env, "BYOC_ORCHESTRATOR_URL": url, "PYTHONPATH": str(ROOT)}
        async with ServeProcess(env=env) as serve, aiohttp.ClientSession() as http:
            try:
                await serve.wait_ready(http)
                await fake.wait_for("/capability/register", timeout=15)
                async with http.get(f"{serve.url}/health") as response:
                    live.health_status = response.status
                async with http.get(f"{serve.url}/metrics") as response:
                    assert response.status == 200
                    live.metrics = await response.text()
                started = time.monotonic()
                serve.signal(signal.SIGTERM)
                live.exit_code = await serve.wait_exit(timeout=30)
                live.drain_s = time.monotonic() - started
            finally:
                live.log = serve.log
                live.requests = list(fake.requests)


@pytest.fixture(scope="module")
def live_serve() -> LiveServe:
    """``python -m byoc serve`` with the compose byoc service's environment and env files."""
    live = LiveServe(env=compose_env_for("byoc"))
    try:
        asyncio.run(_run_live_serve(live))
    except Exception as exc:
        pytest.fail(f"byoc serve with the compose settings failed: {exc!r}\n--- its log ---\n{live.log}")
    return live


CHECKLIST_METRICS = {
    "byoc_sessions_active",
    "byoc_sessions_capacity",
    "byoc_frame_latency_ms_bucket",
    "byoc_frame_latency_ms_sum",
    "byoc_frame_latency_ms_count",
    "byoc_process_latency_ms_bucket",
    "byoc_gpu_memory_bytes",
    "byoc_errors_total",
    "byoc_frames_in_total",
    "byoc_frames_out_total",
    "byoc_frames_dropped_total",
    "byoc_sessions_started_total",
    "byoc_sessions_ended_total",
    "byoc_state",
    "byoc_info",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
}


def test_live_byoc_serve_exports_the_metrics_the_deploy_files_rely_on(live_serve: LiveServe) -> None:
    names = exported_names(live_serve.metrics)
    assert names >= CHECKLIST_METRICS, f"missing: {sorted(CHECKLIST_METRICS - names)}"
    # Without a GPU the family is announced with no samples; with one it has used and total.
    gpu_samples = [
        sample
        for family in text_string_to_metric_families(live_serve.metrics)
        if family.name == "byoc_gpu_memory_bytes"
        for sample in family.samples
    ]
    assert {sample.labels.get("kind") for sample in gpu_samples} in ({"used", "total"}, set())


def test_dashboard_and_alert_rules_name_only_exported_metrics(live_serve: LiveServe) -> None:
    """byoc_* and process_* names must be exported by byoc serve; ``up`` is Prometheus' own.

    The orchestrator's own metrics (``livepeer_*``) may be used only in a selector with
    job="orchestrator"; process_* exists in both jobs, so it needs job="byoc".
    """
    exported = exported_names(live_serve.metrics)
    queries = [("dashboard", title, expr) for title, expr in dashboard_queries()]
    queries += [("rules", name, expr) for name, expr in rule_queries()]
    assert len(queries) >= 15
    problems: list[str] = []
    for source, title, expr in queries:
        for selector in promql_selectors(expr):
            where = f"{source} {title!r}: {selector.name}"
            if selector.name == "up":
                continue
            if selector.name.startswith("livepeer_"):
                if not selector.matches_exactly("job", ORCHESTRATOR_JOB):
                    problems.append(f'{where} needs job="{ORCHESTRATOR_JOB}"')
            elif selector.name.startswith(("byoc_", "process_")):
                if selector.name not in exported:
                    problems.append(f"{where} is not exported by byoc serve")
                if selector.name.startswith("process_") and not selector.matches_exactly("job", BYOC_JOB):
                    problems.append(f'{where} needs job="{BYOC_JOB}" (the orchestrator exports it too)')
            else:
                problems.append(f"{where} is neither byoc's, the orchestrator's nor up")
    assert not problems, "\n".join(problems)


# --- the compose stack's byoc settings ------------------------------------------------------------


def test_compose_byoc_settings_register_and_serve(live_serve: LiveServe) -> None:
    env = live_serve.env
    assert live_serve.health_status == 200, live_serve.log
    registrations = [r for r in live_serve.requests if r[0] == "/capability/register"]
    assert registrations, live_serve.log
    _, authorization, body = registrations[0]
    assert authorization == read_env_file(EXAMPLE_ENV)["BYOC_ORCH_SECRET"]
    info = json.loads(body)
    assert info["name"] == env["BYOC_CAPABILITY_NAME"]
    assert info["url"] == env["BYOC_CAPABILITY_URL"]
    assert info["capacity"] == int(env["BYOC_MAX_SESSIONS"])
    assert f'processor="{env["BYOC_PROCESSOR"]}"' in live_serve.metrics


def test_compose_byoc_drains_within_its_stop_grace_period(live_serve: LiveServe) -> None:
    byoc = service("byoc")
    grace = duration_s(byoc["stop_grace_period"])
    assert byoc.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert grace > drain_timeout_s(live_serve.env)
    assert live_serve.exit_code == 0, live_serve.log
    assert live_serve.drain_s < grace
    unregisters = [r for r in live_serve.requests if r[0] == "/capability/unregister"]
    assert unregisters
    assert unregisters[0][2].decode() == live_serve.env["BYOC_CAPABILITY_NAME"]

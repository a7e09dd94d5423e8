"""The Prometheus side of the deployment: promtool accepts the config, the alert rules and every dashboard
query; the alerts fire (and stay quiet) on synthetic series; the dashboard and rules cover what they must;
Prometheus scrapes byoc and the orchestrator.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.deploy_support import (
    BYOC_JOB,
    ORCHESTRATOR_JOB,
    PROMETHEUS_CONFIG,
    ROOT,
    RULES,
    Selector,
    compose_env_for,
    dashboard_queries,
    dockerfile_env,
    exported_names,
    load_yaml,
    needs_promtool,
    promql_selectors,
    promtool_series,
    promtool_test_rules,
    rule_queries,
    run_promtool,
    service,
)

# --- promtool ----------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_prometheus_config() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr  # rules.yml is loaded with it


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    result = run_promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_queries())} rules found" in result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_every_dashboard_query(tmp_path: Path) -> None:
    """Grafana's $__ variables replaced by what Grafana puts there, each query must be valid PromQL."""
    rules = [
        {"record": f"dashboard:query_{index}", "expr": re.sub(r"\$__\w+", "1m", expr)}
        for index, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alerts_fire_on_trouble_and_stay_quiet_otherwise(tmp_path: Path) -> None:
    """promtool's rule unit tests on synthetic series (annotations dropped: only expressions matter)."""
    rules = load_yaml(RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(yaml.safe_dump(rules))

    bad = {"job": BYOC_JOB, "instance": "bad:8000"}
    good = {"job": BYOC_JOB, "instance": "good:8000"}

    def alert(name: str, at: str, *labels: Mapping[str, str]) -> dict[str, Any]:
        return {
            "eval_time": at,
            "alertname": name,
            "exp_alerts": [{"exp_labels": dict(label)} for label in labels],
        }

    warning = {"severity": "warning"}
    critical = {"severity": "critical"}
    series = [
        # down for good, up for the other one
        promtool_series("up", bad, "0x20"),
        promtool_series("up", good, "1x20"),
        # the broken container reports ERROR; the healthy one is OK
        promtool_series("byoc_state", {**bad, "state": "ERROR"}, "1x20"),
        promtool_series("byoc_state", {**good, "state": "ERROR"}, "0x20"),
        promtool_series("byoc_state", {**good, "state": "OK"}, "1x20"),
        # full for 20 minutes vs half full
        promtool_series("byoc_sessions_active", bad, "4x25"),
        promtool_series("byoc_sessions_capacity", bad, "4x25"),
        promtool_series("byoc_sessions_active", good, "2x25"),
        promtool_series("byoc_sessions_capacity", good, "4x25"),
        # sessions but no frames vs frames flowing
        promtool_series("byoc_frames_out_total", bad, "1000x25"),
        promtool_series("byoc_frames_out_total", good, "0+1800x25"),
        # GPU 95 % vs 50 % full
        promtool_series("byoc_gpu_memory_bytes", {**bad, "device": "0", "kind": "used"}, "95x20"),
        promtool_series("byoc_gpu_memory_bytes", {**bad, "device": "0", "kind": "total"}, "100x20"),
        promtool_series("byoc_gpu_memory_bytes", {**good, "device": "0", "kind": "used"}, "50x20"),
        promtool_series("byoc_gpu_memory_bytes", {**good, "device": "0", "kind": "total"}, "100x20"),
    ]
    # Frame latency: every frame of `bad` in the 66..100 ms bucket, every frame of `good` under 10 ms.
    for le, bad_values, good_values in (
        ("10", "0x25", "0+1800x25"),
        ("66", "0x25", "0+1800x25"),
        ("100", "0+1800x25", "0+1800x25"),
        ("+Inf", "0+1800x25", "0+1800x25"),
    ):
        series.append(promtool_series("byoc_frame_latency_ms_bucket", {**bad, "le": le}, bad_values))
        series.append(promtool_series("byoc_frame_latency_ms_bucket", {**good, "le": le}, good_values))

    tests: list[dict[str, Any]] = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                alert("ByocDown", "5m", {**bad, **critical}),
                alert("ByocError", "5m", {**bad, **critical, "state": "ERROR"}),
                alert("ByocAtCapacity", "10m"),  # not yet: 15 minutes
                alert("ByocAtCapacity", "20m", {**bad, **warning}),
                alert("ByocNoOutput", "15m", {**bad, **critical}),
                alert("ByocGpuMemoryHigh", "10m", {**bad, **warning, "device": "0"}),
                alert("ByocFrameLatencyHigh", "20m", {**bad, **warning}),
                alert("ByocTargetMissing", "10m"),
            ],
        },
        {
            # an error burst after a quiet hour is "rising"; the same rate for two hours is not,
            # but it is "sustained"
            "interval": "1m",
            "input_series": [
                promtool_series("byoc_errors_total", {**bad, "type": "process"}, "0x60 0+60x20"),
                promtool_series("byoc_errors_total", {**good, "type": "decode"}, "0+60x140"),
            ],
            "alert_rule_test": [
                alert("ByocErrorRateRising", "75m", {**bad, **warning, "type": "process"}),
                alert("ByocErrorRateRising", "135m"),
                alert("ByocErrorsSustained", "135m", {**good, **warning, "type": "decode"}),
            ],
        },
        {
            # no byoc target at all
            "interval": "1m",
            "input_series": [promtool_series("up", {"job": ORCHESTRATOR_JOB, "instance": "o:7935"}, "1x10")],
            "alert_rule_test": [alert("ByocTargetMissing", "10m", {**warning, "job": BYOC_JOB})],
        },
    ]
    promtool_test_rules(tmp_path, rules_path, tests)


# --- dashboards and rules name only what byoc serve exports --------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('up{job="byoc"} == 0', [Selector("up", (("job", "=", "byoc"),))]),
        (
            "histogram_quantile(0.99, sum by (job, le) (rate(byoc_frame_latency_ms_bucket[5m]))) > 66",
            [Selector("byoc_frame_latency_ms_bucket")],
        ),
        (
            'a_used{kind="used"} / ignoring(kind) group_left a_total{kind=~"total|x"} > 0.9',
            [Selector("a_used", (("kind", "=", "used"),)), Selector("a_total", (("kind", "=~", "total|x"),))],
        ),
        (
            "sum without (state) (rate(x_total[$__rate_interval] offset 5m)) and on (instance) y > 1e3",
            [Selector("x_total"), Selector("y")],
        ),
        ("absent(up) or vector(0) * count(z) by (le)", [Selector("up"), Selector("z")]),
    ],
)
def test_promql_selector_extraction(expr: str, expected: list[Selector]) -> None:
    assert promql_selectors(expr) == expected


@pytest.mark.parametrize("expr", ['{__name__="byoc_state"}', "ratee(byoc_errors_total[5m])", 'x{job="a"'])
def test_promql_selector_extraction_refuses_what_it_cannot_check(expr: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        promql_selectors(expr)


def test_exported_names_follow_family_types() -> None:
    text = (
        "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n"
        '# HELP h H.\n# TYPE h histogram\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'
        "# HELP g G.\n# TYPE g gauge\n"
    )
    names = exported_names(text)
    assert {"a_total", "h_bucket", "h_sum", "h_count", "g"} <= names
    assert "a" not in names  # a counter's family name is no series
    assert "h" not in names


def test_dashboard_has_the_required_panels() -> None:
    by_metric: dict[str, list[str]] = {}
    for _, expr in dashboard_queries():
        for selector in promql_selectors(expr):
            by_metric.setdefault(selector.name, []).append(expr)
    for name in (
        "byoc_sessions_active",
        "byoc_sessions_capacity",
        "byoc_gpu_memory_bytes",
        "byoc_errors_total",
        "byoc_frames_dropped_total",
        "byoc_state",
    ):
        assert name in by_metric, f"no panel shows {name}"
    latency = " ".join(by_metric.get("byoc_frame_latency_ms_bucket", []))
    for quantile in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({quantile}," in latency, f"no frame latency p{quantile}"
    gpu = " ".join(by_metric["byoc_gpu_memory_bytes"])
    assert 'kind="used"' in gpu
    assert 'kind="total"' in gpu
    assert any("by (type)" in expr for expr in by_metric["byoc_errors_total"])
    assert any("by (reason)" in expr for expr in by_metric["byoc_frames_dropped_total"])


def test_alert_rules_cover_the_failure_modes() -> None:
    exprs = " \n".join(expr for _, expr in rule_queries())
    assert re.search(r'up\{job=~"byoc\|byoc-runner"\}\s*==\s*0', exprs)
    assert 'byoc_state{state="ERROR"} == 1' in exprs
    assert re.search(r"byoc_sessions_active\s*>=\s*byoc_sessions_capacity", exprs)
    assert re.search(r"histogram_quantile\(0\.99,.*byoc_frame_latency_ms_bucket", exprs)
    assert re.search(r'byoc_gpu_memory_bytes\{kind="used"\}\s*/\s*ignoring\(kind\)', exprs)
    assert "rate(byoc_errors_total[" in exprs
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_prometheus_scrapes_byoc_and_the_orchestrator() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: [target for static in job.get("static_configs", []) for target in static["targets"]]
        for name, job in jobs.items()
    }
    byoc_port = compose_env_for("byoc").get("BYOC_PORT", dockerfile_env()["BYOC_PORT"])
    assert jobs[BYOC_JOB].get("metrics_path", "/metrics") == "/metrics"
    assert f"byoc:{byoc_port}" in targets[BYOC_JOB]
    orchestrator_flags = dict(
        str(arg).lstrip("-").partition("=")[::2] for arg in service("orchestrator")["command"]
    )
    cli_port = orchestrator_flags["cliAddr"].rpartition(":")[2]
    assert f"orchestrator:{cli_port}" in targets[ORCHESTRATOR_JOB]
    assert jobs[ORCHESTRATOR_JOB].get("metrics_path", "/metrics") == "/metrics"
    # rules.yml is found next to prometheus.yml, here and in the container
    assert config["rule_files"] == ["rules.yml"]
    mounts = [str(volume).split(":") for volume in service("prometheus")["volumes"]]
    targets_of = {Path(host).name: container for host, container, *_ in mounts}
    assert posixpath.dirname(targets_of["rules.yml"]) == posixpath.dirname(targets_of["prometheus.yml"])

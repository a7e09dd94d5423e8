"""The deployment files hold together: image, compose stack, Prometheus, Grafana, Kubernetes.

* promtool accepts the Prometheus config, the alert rules and every dashboard query, and the alerts
  fire (and stay quiet) on synthetic series;
* every metric that a dashboard panel or an alert names is one a live ``byoc serve`` exports, started
  here with the compose stack's own byoc settings against a fake orchestrator, which also shows that
  those settings register the capability and that SIGTERM drains within the stop grace period;
* the compose and Kubernetes manifests say what matters (grace periods above the drain timeout,
  probes on /health, scraping of /metrics, the secret only in the example env file);
* the Docker build context, computed with Docker's .dockerignore rules, holds every COPY source and
  nothing secret, and the Dockerfile runs ``byoc serve`` in exec form, as a non-root user, with
  STOPSIGNAL, HEALTHCHECK and EXPOSE 8000;
* the example processor the image ships works.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from byoc.processor import Frame, Processor, SessionContext, load_processor
from tests.e2e.serve import ServeProcess
from tests.support import FakeOrchestrator, serve_app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
EXAMPLE_ENV = DEPLOY / "example.env"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "byoc.json"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
KUBERNETES = DEPLOY / "kubernetes"

BYOC_JOB = "byoc"
ORCHESTRATOR_JOB = "orchestrator"
EXAMPLE_PROCESSOR = "examples.sepia_processor:SepiaProcessor"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)"
)


# --- small readers ------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads them (no quotes used here; comments and blanks skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


def secret_values(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if re.search(r"SECRET|PASSWORD|TOKEN", k) and v}


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}


def duration_s(text: str | int | float) -> float:
    """A compose or Prometheus duration ("10s", "1m30s", "500ms") in seconds."""
    if isinstance(text, int | float):
        return float(text)
    parts = _DURATION_PART.findall(text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def compose() -> dict[str, Any]:
    loaded = load_yaml(COMPOSE)
    assert isinstance(loaded, dict)
    return loaded


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"compose.yaml has no service {name!r}"
    result: dict[str, Any] = services[name]
    return result


def service_environment(svc: Mapping[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def env_files(svc: Mapping[str, Any], *, required_only: bool = False) -> list[Path]:
    entries = svc.get("env_file") or []
    if isinstance(entries, str):
        entries = [entries]
    paths = [
        entry["path"] if isinstance(entry, dict) else entry
        for entry in entries
        if not (required_only and isinstance(entry, dict) and entry.get("required") is False)
    ]
    return [(COMPOSE.parent / path).resolve() for path in paths]


def compose_env_for(name: str) -> dict[str, str]:
    """What a compose service sees: its env files in order, then its `environment`.

    Optional env files (a user's deploy/secrets.env) are left out, so that the result is the
    repository's own configuration.
    """
    svc = service(name)
    env: dict[str, str] = {}
    for path in env_files(svc, required_only=True):
        env.update(read_env_file(path))
    env.update(service_environment(svc))
    return env


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in parse_dockerfile(DOCKERFILE.read_text()):
        if instruction.keyword == "ENV":
            words = shlex.split(instruction.args)
            if words and "=" not in words[0]:
                env[words[0]] = " ".join(words[1:])
            else:
                env.update(word.split("=", 1) for word in words)  # type: ignore[misc]
    return env


def drain_timeout_s(env: Mapping[str, str]) -> float:
    return float(env.get("BYOC_DRAIN_TIMEOUT_S", dockerfile_env().get("BYOC_DRAIN_TIMEOUT_S", "8")))


def kubernetes_documents() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def kubernetes_object(kind: str) -> dict[str, Any]:
    found = [doc for doc in kubernetes_documents() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under deploy/kubernetes, found {len(found)}"
    return found[0]


def byoc_container() -> dict[str, Any]:
    containers = kubernetes_object("Deployment")["spec"]["template"]["spec"]["containers"]
    byoc = [c for c in containers if c["name"] == "byoc"]
    assert byoc, "the Deployment has no container named byoc"
    result: dict[str, Any] = byoc[0]
    return result


# --- PromQL: which metric names an expression selects ---------------------------------------------

# Names that are followed by "(" without being metrics (Prometheus 2.x and 3.x).
PROMQL_FUNCTIONS = frozenset(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month
    deg delta deriv exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum holt_winters double_exponential_smoothing hour
    idelta increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time
    max_over_time min_over_time minute month pi predict_linear present_over_time quantile_over_time
    rad rate resets round scalar sgn sin sinh sort sort_by_label sort_by_label_desc sort_desc sqrt
    stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year""".split()  # noqa: SIM905
)
PROMQL_AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio".split()  # noqa: SIM905
)
PROMQL_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})

_PROMQL_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<variable>\$\{[^}]*\}|\$\w+)
    | (?P<range>\[[^\]]*\])
    | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b)
    | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>(){},=@])
    | (?P<space>\s+)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Selector:
    """A metric name in an expression with its label matchers, e.g. up{job="byoc"}."""

    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()

    def matches_exactly(self, label: str, value: str) -> bool:
        return (label, "=", value) in self.matchers


def _promql_tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _PROMQL_TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot tokenize {expr[position:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


def promql_selectors(expr: str) -> list[Selector]:
    """Every metric selector of a PromQL expression; functions, keywords and label names are skipped.

    Raises ValueError for what it cannot vouch for: an unknown function, a selector without a
    metric name (``{__name__=~...}``), unbalanced brackets.
    """
    tokens = _promql_tokens(expr)
    selectors: list[Selector] = []
    i = 0

    def next_is(index: int, text: str) -> bool:
        return index < len(tokens) and tokens[index] == ("op", text)

    def read_matchers(start: int) -> tuple[tuple[tuple[str, str, str], ...], int]:
        """Matchers from the token after ``{`` up to the closing ``}``; returns the index after it."""
        matchers: list[tuple[str, str, str]] = []
        j = start
        while j < len(tokens) and tokens[j] != ("op", "}"):
            if tokens[j][0] == "ident":
                if j + 2 >= len(tokens) or tokens[j + 2][0] != "string":
                    raise ValueError(f"bad label matcher near {tokens[j][1]!r} in {expr!r}")
                matchers.append((tokens[j][1], tokens[j + 1][1], tokens[j + 2][1][1:-1]))
                j += 3
            else:
                j += 1
        if j >= len(tokens):
            raise ValueError(f"unclosed {{ in {expr!r}")
        return tuple(matchers), j + 1

    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "op" and text == "{":
            raise ValueError(f"selector without a metric name in {expr!r}")
        if kind != "ident":
            i += 1
            continue
        if text in PROMQL_LABEL_LIST_KEYWORDS:
            i += 1
            if next_is(i, "("):  # a list of label names, not metrics
                close = next((j for j in range(i, len(tokens)) if tokens[j] == ("op", ")")), None)
                if close is None:
                    raise ValueError(f"unclosed label list after {text!r} in {expr!r}")
                i = close + 1
            continue
        if text in PROMQL_KEYWORDS:
            i += 1
            continue
        if text in PROMQL_AGGREGATIONS and (
            next_is(i + 1, "(") or (i + 1 < len(tokens) and tokens[i + 1][1] in ("by", "without"))
        ):
            i += 1
            continue
        if next_is(i + 1, "("):
            if text not in PROMQL_FUNCTIONS and text not in PROMQL_AGGREGATIONS:
                raise ValueError(f"unknown PromQL function {text!r} in {expr!r}")
            i += 1
            continue
        matchers: tuple[tuple[str, str, str], ...] = ()
        i += 1
        if next_is(i, "{"):
            matchers, i = read_matchers(i + 1)
        selectors.append(Selector(text, matchers))
    return selectors


def exported_names(exposition: str) -> set[str]:
    """Series names a /metrics text can produce, by family type (a family without samples counts)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        if family.type in suffixes:
            names.update(family.name + suffix for suffix in suffixes[family.type])
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of the dashboard, rows' nested panels included."""
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    queries = [
        (str(panel.get("title")), str(target["expr"]))
        for panel in panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            raise AssertionError("template variable queries are not checked yet: add them here")
    return queries


def rule_queries() -> list[tuple[str, str]]:
    groups = load_yaml(RULES)["groups"]
    return [
        (str(rule.get("alert") or rule.get("record")), str(rule["expr"]))
        for group in groups
        for rule in group["rules"]
    ]


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
                live.requests = fake.requests


@pytest.fixture(scope="module")
def live_serve() -> LiveServe:
    """``python -m byoc serve`` with the compose byoc service's environment and env files."""
    live = LiveServe(env=compose_env_for("byoc"))
    try:
        asyncio.run(_run_live_serve(live))
    except Exception as exc:
        pytest.fail(f"byoc serve with the compose settings failed: {exc!r}\n--- its log ---\n{live.log}")
    return live


# --- promtool ----------------------------------------------------------------------------------


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


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


def _series(name: str, labels: Mapping[str, str], values: str) -> dict[str, str]:
    rendered = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


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
        _series("up", bad, "0x20"),
        _series("up", good, "1x20"),
        # the broken container reports ERROR; the healthy one is OK
        _series("byoc_state", {**bad, "state": "ERROR"}, "1x20"),
        _series("byoc_state", {**good, "state": "ERROR"}, "0x20"),
        _series("byoc_state", {**good, "state": "OK"}, "1x20"),
        # full for 20 minutes vs half full
        _series("byoc_sessions_active", bad, "4x25"),
        _series("byoc_sessions_capacity", bad, "4x25"),
        _series("byoc_sessions_active", good, "2x25"),
        _series("byoc_sessions_capacity", good, "4x25"),
        # sessions but no frames vs frames flowing
        _series("byoc_frames_out_total", bad, "1000x25"),
        _series("byoc_frames_out_total", good, "0+1800x25"),
        # GPU 95 % vs 50 % full
        _series("byoc_gpu_memory_bytes", {**bad, "device": "0", "kind": "used"}, "95x20"),
        _series("byoc_gpu_memory_bytes", {**bad, "device": "0", "kind": "total"}, "100x20"),
        _series("byoc_gpu_memory_bytes", {**good, "device": "0", "kind": "used"}, "50x20"),
        _series("byoc_gpu_memory_bytes", {**good, "device": "0", "kind": "total"}, "100x20"),
    ]
    # Frame latency: every frame of `bad` in the 66..100 ms bucket, every frame of `good` under 10 ms.
    for le, bad_values, good_values in (
        ("10", "0x25", "0+1800x25"),
        ("66", "0x25", "0+1800x25"),
        ("100", "0+1800x25", "0+1800x25"),
        ("+Inf", "0+1800x25", "0+1800x25"),
    ):
        series.append(_series("byoc_frame_latency_ms_bucket", {**bad, "le": le}, bad_values))
        series.append(_series("byoc_frame_latency_ms_bucket", {**good, "le": le}, good_values))

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
                _series("byoc_errors_total", {**bad, "type": "process"}, "0x60 0+60x20"),
                _series("byoc_errors_total", {**good, "type": "decode"}, "0+60x140"),
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
            "input_series": [_series("up", {"job": ORCHESTRATOR_JOB, "instance": "o:7935"}, "1x10")],
            "alert_rule_test": [alert("ByocTargetMissing", "10m", {**warning, "job": BYOC_JOB})],
        },
    ]
    test_path = tmp_path / "rules-test.yml"
    test_path.write_text(
        yaml.safe_dump({"rule_files": [str(rules_path)], "evaluation_interval": "1m", "tests": tests})
    )
    result = run_promtool("test", "rules", str(test_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


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
    assert re.search(r'up\{job="byoc"\}\s*==\s*0', exprs)
    assert 'byoc_state{state="ERROR"} == 1' in exprs
    assert re.search(r"byoc_sessions_active\s*>=\s*byoc_sessions_capacity", exprs)
    assert re.search(r"histogram_quantile\(0\.99,.*byoc_frame_latency_ms_bucket", exprs)
    assert re.search(r'byoc_gpu_memory_bytes\{kind="used"\}\s*/\s*ignoring\(kind\)', exprs)
    assert "rate(byoc_errors_total[" in exprs
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


# --- the compose stack -------------------------------------------------------------------------


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


# --- the Docker build context and the Dockerfile -------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside continuations) dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def _exec_form(args: str) -> list[str] | None:
    """The JSON-array (exec) form's arguments, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


@dataclass(frozen=True)
class IgnorePattern:
    text: str
    regex: re.Pattern[str]
    exception: bool


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern language: * and ? within a path part, ** across parts, [classes], \\ escapes."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                if body.startswith(("^", "!")):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(char))
        i += 1
    out.append("$")
    return re.compile("".join(out))


def read_dockerignore(text: str) -> list[IgnorePattern]:
    patterns: list[IgnorePattern] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        line = posixpath.normpath(line)
        if len(line) > 1 and line.startswith("/"):
            line = line.lstrip("/")
        patterns.append(IgnorePattern(raw.strip(), _pattern_regex(line), exception))
    return patterns


def ignored(path: str, patterns: Iterable[IgnorePattern]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        if any(pattern.regex.match(candidate) for candidate in candidates):
            result = not pattern.exception
    return result


def build_context(root: Path, patterns: list[IgnorePattern]) -> set[str]:
    """The files `docker build root` sends, as paths relative to root."""
    has_exceptions = any(p.exception for p in patterns)
    files: set[str] = set()
    for directory, subdirs, filenames in os.walk(root):
        relative = Path(directory).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        if not has_exceptions:  # nothing can come back from an ignored folder: do not descend
            subdirs[:] = [d for d in subdirs if not ignored(prefix + d, patterns)]
        files.update(prefix + name for name in filenames if not ignored(prefix + name, patterns))
    return files


@pytest.mark.parametrize(
    ("patterns", "path", "expected"),
    [
        (["**/__pycache__"], "src/byoc/__pycache__/x.pyc", True),
        (["**/__pycache__"], "__pycache__/x.pyc", True),
        (["out"], "out/a.ts", True),
        (["out"], "src/out/a.ts", False),  # unlike .gitignore, a plain name is anchored at the root
        (["*.env"], "example.env", True),
        (["*.env"], "deploy/example.env", False),
        (["**/*.env"], "deploy/example.env", True),
        (["/build"], "build/lib/x.py", True),
        (["deploy", "!deploy/keep.txt"], "deploy/keep.txt", False),
        (["deploy", "!deploy/keep.txt"], "deploy/other.txt", True),
        (["*", "!src"], "src/byoc/cli.py", False),
        (["*", "!src"], "README.md", True),
        (["docs/**/*.md"], "docs/a/b/c.md", True),
        (["docs/**/*.md"], "docs/c.md", True),
        (["docs/**/*.md"], "docs/c.txt", False),
        (["demo-output*"], "demo-output-1/frame.png", True),
        (["src/?.py"], "src/a.py", True),
        (["src/?.py"], "src/ab.py", False),
        (["src/[ab].py"], "src/b.py", True),
        (["src/[!ab].py"], "src/b.py", False),
        (["**"], "anything/at/all", True),
    ],
)
def test_dockerignore_semantics(patterns: list[str], path: str, expected: bool) -> None:
    assert ignored(path, read_dockerignore("\n".join(patterns))) is expected


@pytest.fixture(scope="module")
def context_files() -> set[str]:
    return build_context(ROOT, read_dockerignore(DOCKERIGNORE.read_text()))


def _copy_sources(instruction: Instruction) -> list[str]:
    words = _exec_form(instruction.args)
    if words is None:
        words = shlex.split(instruction.args)
        words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def test_every_copy_source_is_in_the_build_context(context_files: set[str]) -> None:
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD") and "--from=" not in i.args]
    assert copies
    sources: list[str] = []
    for instruction in copies:
        for source in _copy_sources(instruction):
            sources.append(source)
            normal = posixpath.normpath(source)
            if normal == ".":
                found = bool(context_files)
            elif any(char in normal for char in "*?["):
                found = any(fnmatch.fnmatchcase(path, normal) for path in context_files)
            else:
                found = normal in context_files or any(p.startswith(normal + "/") for p in context_files)
            assert found, f"line {instruction.line}: COPY source {source!r} is not in the build context"
    # what `pip install .` needs: the project file, its readme and the package sources
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    copied = {posixpath.normpath(source) for source in sources}
    assert {"pyproject.toml", readme, "src", "examples"} <= copied | {"."}, copied


def test_the_build_context_holds_the_sources_and_nothing_private(context_files: set[str]) -> None:
    needed = {
        "pyproject.toml",
        "README.md",
        "src/byoc/__init__.py",
        "src/byoc/cli.py",
        "examples/__init__.py",
        "examples/sepia_processor.py",
    }
    assert needed <= context_files, sorted(needed - context_files)
    unwanted = [
        path
        for path in context_files
        if path.split("/")[0] in {".git", ".venv", "tests", "deploy", ".mypy_cache", ".pytest_cache"}
        or "__pycache__" in path.split("/")
        or path.endswith(".env")
    ]
    assert not unwanted, sorted(unwanted)[:20]


def test_dockerfile_runs_byoc_serve_properly() -> None:
    instructions = parse_dockerfile(DOCKERFILE.read_text())

    def last(keyword: str) -> Instruction:
        found = [i for i in instructions if i.keyword == keyword]
        assert found, f"the Dockerfile has no {keyword}"
        return found[-1]

    base_args = [i.args for i in instructions if i.keyword == "ARG" and i.args.startswith("BASE_IMAGE=")]
    assert base_args == ["BASE_IMAGE=python:3.11-slim"]
    assert last("FROM").args.split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE")

    entrypoint = _exec_form(last("ENTRYPOINT").args)
    assert entrypoint is not None, "ENTRYPOINT must be in exec (JSON array) form"
    assert any(entrypoint[n : n + 2] == ["byoc", "serve"] for n in range(len(entrypoint)))
    for cmd in (i for i in instructions if i.keyword == "CMD"):
        assert _exec_form(cmd.args) is not None, f"line {cmd.line}: CMD must be in exec form"

    assert last("STOPSIGNAL").args in ("SIGTERM", "15")
    healthcheck = last("HEALTHCHECK").args
    assert healthcheck.upper() != "NONE"
    probe = _exec_form(healthcheck.partition("CMD")[2].strip())
    assert probe is not None, "HEALTHCHECK CMD must be in exec form"
    assert "/health" in " ".join(probe)
    assert "urllib" in " ".join(probe)

    user = last("USER").args.split(":")[0]
    assert user
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"
    exposed = {port for i in instructions if i.keyword == "EXPOSE" for port in i.args.split()}
    assert "8000" in exposed or "8000/tcp" in exposed

    env = dockerfile_env()
    assert env["BYOC_PORT"] == "8000"
    assert float(env["BYOC_DRAIN_TIMEOUT_S"]) < 10  # docker stop's default grace period
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "pip install --no-cache-dir" in runs


# --- the example processor the image ships -------------------------------------------------------


class _Sink:
    def send_data(self, message: Any) -> None:
        pass

    def send_event(self, event: Mapping[str, Any]) -> None:
        pass


def _frame(rgb: np.ndarray) -> Frame:
    return Frame(av.VideoFrame.from_ndarray(rgb, format="rgb24"))


def _session(params: dict[str, Any]) -> SessionContext:
    return SessionContext("s", 16, 16, params, _Sink())


@pytest.fixture
def sepia(monkeypatch: pytest.MonkeyPatch) -> Processor:
    monkeypatch.syspath_prepend(str(ROOT))
    return load_processor(EXAMPLE_PROCESSOR, {"strength": "0.5"})


def test_example_processor_tones_frames_sepia(sepia: Processor) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    session = _session({"strength": 1})
    sepia.on_start(session)
    out = np.asarray(sepia.process(_frame(rgb), session))
    assert out.shape == (16, 16, 3)
    assert out.dtype == np.uint8
    expected = np.clip(
        np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]]) @ [200, 100, 50],
        0,
        255,
    )
    assert np.abs(out[8, 8].astype(float) - expected).max() <= 1.0
    assert out[8, 8, 0] >= out[8, 8, 1] >= out[8, 8, 2]  # warm: red over green over blue


def test_example_processor_strength_comes_from_options_then_params(sepia: Processor) -> None:
    rgb = np.full((16, 16, 3), 128, dtype=np.uint8)
    session = _session({})
    sepia.on_start(session)
    assert session.state["strength"] == 0.5  # the container-wide option
    sepia.on_params(session, {"strength": "loud"})  # a bad update is ignored
    assert session.state["strength"] == 0.5
    sepia.on_params(session, {"strength": 0})
    frame = _frame(rgb)
    assert sepia.process(frame, session) is frame  # strength 0: untouched, not even converted
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        load_processor(EXAMPLE_PROCESSOR, {"strength": "2"})


def test_readme_deploying_section_names_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deploying\n" in readme
    section = readme.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:deploy|examples)/[\w./-]+|Dockerfile|\.dockerignore)`", section))
    assert "deploy/compose.yaml" in named
    optional = {"deploy/secrets.env"}  # the user's own file, never in the repository
    missing = sorted(path for path in named - optional if not (ROOT / path).exists())
    assert not missing, missing

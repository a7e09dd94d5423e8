"""What the deploy tests share: where the deployment files are, readers for them, and which metric names a
PromQL expression selects."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)"
)


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS`` from the repository's root (paths may be relative to it)."""
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def promtool_series(name: str, labels: Mapping[str, str], values: str) -> dict[str, str]:
    """One input series of a promtool rule test: ``name{labels}`` with promtool's ``values`` notation."""
    rendered = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


def promtool_test_rules(directory: Path, rules: Path, tests: Sequence[object]) -> None:
    """Run promtool's rule unit ``tests`` (evaluated every minute) on the rule file ``rules``."""
    test_path = directory / f"{rules.stem}-test.yml"
    test_path.write_text(
        yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": list(tests)})
    )
    result = run_promtool("test", "rules", str(test_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


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


# --- the Dockerfile's instructions ---------------------------------------------------------------


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

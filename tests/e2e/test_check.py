"""``byoc check`` end to end: a well-behaved container passes, a broken one fails the matching items."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def run_check(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    figures = tmp_path / "check.json"
    command = [sys.executable, "-m", "byoc", "check", *args, "--sessions", "3", "--step-seconds", "3"]
    command += ["--settle-seconds", "1.5", "--json", str(figures), "--report", str(tmp_path / "report")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path.cwd())
    return result.returncode, result.stdout + result.stderr, json.loads(figures.read_text())


def test_a_container_that_behaves_passes_every_item(tmp_path: Path) -> None:
    code, output, figures = run_check(
        tmp_path, "load", "--processor-option", "memory_mb=128", "--processor-option", "ms=1"
    )
    assert code == 0, output
    assert "all checks passed" in output
    items = {item["name"]: item for item in figures["items"]}
    assert set(items) == {"memory", "throughput", "health", "shutdown", "metrics", "bad input"}
    assert all(item["passed"] for item in items.values())
    fit = next(f for f in figures["fits"] if f["resource"] == "rss")
    assert 0.75 * 128 * MIB <= fit["per_session"] <= 1.25 * 128 * MIB  # the configured 128 MiB, within 25 %
    expected = (fit["total"] - fit["headroom"] - fit["base"]) // fit["per_session"]
    assert fit["recommended_max_sessions"] == expected
    assert figures["recommended_max_sessions"] == expected
    assert [step["sessions"] for step in figures["steps"]] == [1, 2, 3]
    assert len(figures["health"]) > 100
    assert len(figures["shutdown"]) == 3
    for name in ("index.html", "report.md", "memory.png", "health.png", "fps.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000, name
    assert (tmp_path / "report" / "memory.png").read_bytes().startswith(b"\x89PNG")


def test_a_leaking_stubborn_container_fails_memory_and_shutdown(tmp_path: Path) -> None:
    code, output, figures = run_check(
        tmp_path,
        "tests.processors:LeakyAndStubborn",
        "--serve-arg=--drain-timeout-s=2",
        "--drain-limit-s",
        "5",
    )
    assert code == 1, output
    items = {item["name"]: item for item in figures["items"]}
    assert not items["memory"]["passed"]
    assert "did not return" in items["memory"]["reason"]
    assert "leak" in items["memory"]["reason"]
    assert not items["shutdown"]["passed"]
    assert "exited with code 1" in items["shutdown"]["reason"]
    assert items["health"]["passed"]
    assert "FAIL  memory" in output
    assert "FAIL  shutdown" in output

"""``byoc check`` end to end: a well-behaved container passes, a broken one fails the matching items."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


INPUT_FPS = 30.0
BEHAVES = ("load", "--processor-option", "memory_mb=128", "--processor-option", "ms=1")
"""A container that behaves: 128 MiB a session, 1 ms of CPU a frame."""


def run_check(tmp_path: Path, *args: str, sessions: int = 3) -> tuple[int, str, dict[str, Any]]:
    figures = tmp_path / "check.json"
    command = [sys.executable, "-m", "byoc", "check", *args, "--sessions", str(sessions)]
    command += ["--step-seconds", "3"]
    command += ["--settle-seconds", "1.5", "--json", str(figures), "--report", str(tmp_path / "report")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path.cwd())
    return result.returncode, result.stdout + result.stderr, json.loads(figures.read_text())


@pytest.mark.parametrize("protocol", ["byoc", "live-runner"])
def test_a_container_that_behaves_passes_every_item(tmp_path: Path, protocol: str) -> None:
    code, output, figures = run_check(
        tmp_path,
        *BEHAVES,
        "--protocol",
        protocol,
    )
    items = {item["name"]: item for item in figures["items"]}
    assert set(items) == {"memory", "throughput", "health", "shutdown", "metrics", "bad input", "isolation"}
    for name in ("memory", "health", "shutdown", "metrics", "bad input", "isolation"):
        assert items[name]["passed"], f"{name}: {items[name]}\n{output}"
    isolation_reports_the_leak_check(items, "thread", output)
    # throughput is a figure of this machine: whichever way it went, it is reported with its figures
    throughput_reported_as_measured(items["throughput"], figures["steps"], output)
    assert (code == 0) == items["throughput"]["passed"], output
    assert ("all checks passed" in output) == items["throughput"]["passed"], output
    fit = next(f for f in figures["fits"] if f["resource"] == "rss")
    assert 0.75 * 128 * MIB <= fit["per_session"] <= 1.25 * 128 * MIB  # the configured 128 MiB, within 25 %
    expected = (fit["total"] - fit["headroom"] - fit["base"]) // fit["per_session"]
    assert fit["recommended_max_sessions"] == expected
    # the recommendation is the smaller of what fits in memory and what kept real time on this machine
    first_late = items["throughput"]["figures"]["first_late"]
    by_throughput = items["throughput"]["figures"]["max_real_time"] if first_late else None
    assert figures["recommended_max_sessions"] == min(v for v in (expected, by_throughput) if v is not None)
    # the ramp goes 1, 2, 3 and stops at the first step this machine could not keep in real time
    steps = figures["steps"]
    assert [step["sessions"] for step in steps] == list(range(1, len(steps) + 1))
    assert len(steps) == 3 or not steps[-1]["real_time"], steps
    assert len(figures["health"]) > 100
    assert len(figures["shutdown"]) == 3
    for name in ("index.html", "report.md", "memory.png", "health.png", "fps.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000, name
    assert (tmp_path / "report" / "memory.png").read_bytes().startswith(b"\x89PNG")


def isolation_reports_the_leak_check(items: dict[str, Any], mode: str, output: str) -> None:
    """The isolation item says its mode and the memory item's figures, with the verdict they give."""
    item, memory = items["isolation"], items["memory"]["figures"]
    figures = item["figures"]
    assert figures["mode"] == mode
    assert figures["leftover_after_sessions"] == memory["leftover_after_sessions"]
    assert figures["leak_tolerance"] == memory["leak_tolerance"]
    assert item["passed"] == (figures["leftover_after_sessions"] <= figures["leak_tolerance"])
    line = next(line for line in output.splitlines() if line.split()[1:2] == ["isolation"])
    assert line.startswith(("PASS" if item["passed"] else "FAIL") + f"  isolation  isolation {mode}: "), line
    assert ("memory came back" in line) == item["passed"], line


def documented_threshold_mb(figures: dict[str, Any]) -> int:
    """README, `byoc check`: 4 times the leftover per session, at least the tolerance and 100 MiB, rounded
    up to a multiple of 50 MiB."""
    per_session = figures["leftover_after_sessions"] / figures["sessions_ended"]
    wanted = max(4 * per_session, figures["leak_tolerance"]) / MIB
    return max(100, math.ceil(float(wanted) / 50) * 50)


def test_process_isolation_counts_the_workers_memory(tmp_path: Path) -> None:
    _, output, figures = run_check(
        tmp_path,
        *BEHAVES,
        "--isolation",
        "process",
        sessions=2,
    )
    items = {item["name"]: item for item in figures["items"]}
    assert items["isolation"]["passed"], f"{items['isolation']}\n{output}"
    assert items["memory"]["passed"], f"{items['memory']}\n{output}"
    isolation_reports_the_leak_check(items, "process", output)
    # the 128 MiB of each session live in the worker process: seen there, and in the container's total
    isolation = items["isolation"]["figures"]
    assert 0.75 * 128 * MIB <= isolation["workers_per_session"] <= 1.25 * 128 * MIB, isolation
    fit = next(f for f in figures["fits"] if f["resource"] == "rss")
    assert 0.75 * 128 * MIB <= fit["per_session"] <= 1.25 * 128 * MIB, fit
    assert isolation["per_session"] == fit["per_session"]
    assert all(sample["workers"] > 0 for sample in figures["memory"][:4])  # the worker runs from the start
    assert [step["sessions"] for step in figures["steps"]] == [1, 2]


def throughput_reported_as_measured(item: dict[str, Any], steps: list[dict[str, Any]], output: str) -> None:
    """The throughput item agrees with the steps' own figures and says them (README, `byoc check`)."""
    for step in steps:
        keeps_up = min(step["fps"]) >= 0.95 * INPUT_FPS
        few_drops = step["dropped_frames"] <= 0.01 * max(step["frames_in"], 1)
        assert step["real_time"] == (keeps_up and few_drops), step
    assert item["passed"] == steps[0]["real_time"]
    late = [step["sessions"] for step in steps if not step["real_time"]]
    assert item["figures"]["first_late"] == (late[0] if late else None)
    lowest = min(min(step["fps"]) for step in steps)
    assert item["figures"]["lowest_fps"] == lowest
    line = next(line for line in output.splitlines() if line.split()[1:2] == ["throughput"])
    assert f"(lowest fps {lowest:.1f} of 30)" in line
    if item["passed"]:
        assert line.startswith("PASS  throughput"), line
        return
    first = steps[0]
    assert line.startswith("FAIL  throughput"), line
    assert item["reason"] == (
        f"even one session is not real-time: {min(first['fps']):.1f} fps of 30, "
        f"{first['dropped_frames']} of {first['frames_in']} frames dropped"
    )
    assert item["reason"] in line


def test_a_processor_too_slow_for_real_time_fails_throughput_with_its_figures(tmp_path: Path) -> None:
    # 60 ms of CPU per frame (holding the GIL) fits at most 16.7 frames/s on any machine
    code, output, figures = run_check(tmp_path, "load", "--processor-option", "ms=60", sessions=1)
    assert code == 1, output
    items = {item["name"]: item for item in figures["items"]}
    assert not items["throughput"]["passed"]
    assert [step["sessions"] for step in figures["steps"]] == [1]
    assert max(figures["steps"][0]["fps"]) < 0.6 * INPUT_FPS
    throughput_reported_as_measured(items["throughput"], figures["steps"], output)
    assert figures["recommended_max_sessions"] == 0
    assert "all checks passed" not in output


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
    # 96 MiB kept per session: the isolation item says so and how to contain it
    isolation_reports_the_leak_check(items, "thread", output)
    leak = items["isolation"]["figures"]
    assert leak["sessions_ended"] == 3
    assert 0.75 * 96 * MIB <= leak["leftover_after_sessions"] / 3 <= 1.25 * 96 * MIB, leak
    threshold = leak["recommended_leak_threshold_mb"]
    assert threshold == documented_threshold_mb(leak)
    assert f"run with --isolation process --leak-threshold-mb {threshold} " in items["isolation"]["reason"]
    assert f"--isolation process --leak-threshold-mb {threshold}" in output

"""The terminal summary, JSON file and HTML/Markdown report of ``byoc check``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from byoc.dev.check.isolation import isolation_item, leak_threshold_mb, recycle_after_sessions
from byoc.dev.check.model import (
    CheckResult,
    HealthSample,
    ItemResult,
    MemoryFit,
    MemorySample,
    SessionShutdown,
    StepResult,
)
from byoc.dev.check.report import terminal_lines, write_json, write_report
from byoc.errors import ConfigError

MIB = 1024 * 1024
GIB = 1024 * MIB

BASE_RSS = 812 * MIB
PER_SESSION_RSS = 143 * MIB + 17  # odd on purpose: the JSON must keep every byte
BASE_GPU = 2 * GIB
PER_SESSION_GPU = 3 * GIB
GPU_TOTAL = 24 * GIB
HOST_TOTAL = 16 * GIB


def _step(sessions: int, start: float) -> StepResult:
    fps = [29.9 - 0.4 * k - (4.0 if sessions == 3 and k == 2 else 0.0) for k in range(sessions)]
    return StepResult(
        sessions=sessions,
        started_at=start,
        ended_at=start + 20.0,
        fps=fps,
        input_fps=30.0,
        dropped_frames=0 if sessions < 3 else 41,
        frames_in=600 * sessions,
        latency_ms_p50=38.5 + sessions,
        latency_ms_p99=71.25 + 10 * sessions,
        peak_rss=BASE_RSS + PER_SESSION_RSS * sessions,
        peak_gpu_used={0: BASE_GPU + PER_SESSION_GPU * sessions},
        peak_torch={0: PER_SESSION_GPU * sessions},
        real_time=sessions < 3,
    )


def _result(summary_of_metrics: str = "12 series, all documented") -> CheckResult:
    steps = [_step(n, 5.0 + 25.0 * (n - 1)) for n in (1, 2, 3)]
    memory = [
        MemorySample(
            t=0.5 * i,
            sessions=min(3, i // 50),
            rss=BASE_RSS + PER_SESSION_RSS * min(3, i // 50),
            gpu_used={0: BASE_GPU + PER_SESSION_GPU * min(3, i // 50)},
            gpu_total={0: GPU_TOTAL},
            torch_peak={0: PER_SESSION_GPU * min(3, i // 50)},
        )
        for i in range(160)
    ]
    health = [HealthSample(t=0.25 * i, latency_ms=1.5 + (i % 7) * 0.3, status=200) for i in range(320)]
    health[200] = HealthSample(t=50.0, latency_ms=1800.0, status=503)
    rss_points = [(n, BASE_RSS + PER_SESSION_RSS * n) for n in range(4)]
    gpu_points = [(n, BASE_GPU + PER_SESSION_GPU * n) for n in range(4)]
    fits = [
        MemoryFit(
            resource="rss",
            base=BASE_RSS,
            per_session=PER_SESSION_RSS,
            residual=3 * MIB + 5,
            points=rss_points,
            total=HOST_TOTAL,
            total_source="cgroup memory.max",
            headroom=HOST_TOTAL // 10,
            recommended_max_sessions=math.floor((HOST_TOTAL - HOST_TOTAL // 10 - BASE_RSS) / PER_SESSION_RSS),
        ),
        MemoryFit(
            resource="gpu0",
            base=BASE_GPU,
            per_session=PER_SESSION_GPU,
            residual=12 * MIB,
            points=gpu_points,
            total=GPU_TOTAL,
            total_source="NVML",
            headroom=GPU_TOTAL // 10,
            recommended_max_sessions=6,  # floor((24 - 2.4 - 2) / 3)
        ),
    ]
    items = [
        ItemResult("memory", True, "base 2.0 GiB, 3.0 GiB per session on gpu0", figures={"per_session": 3}),
        ItemResult("throughput", False, "3 sessions: min 25.1 fps", reason="below 28.5 fps (95 % of 30)"),
        ItemResult("health", True, "p99 2.9 ms under load, 1 of 320 not 200"),
        ItemResult("shutdown", True, "3 of 3 sessions closed cleanly"),
        ItemResult("metrics", True, summary_of_metrics),
    ]
    shutdown = [SessionShutdown(f"check-{k}", True, k != 2, True) for k in range(3)]
    return CheckResult(
        processor="my_model.pipeline:Depth",
        container_url="http://127.0.0.1:8000",
        started_at="2025-01-31T12:00:00Z",
        gpu=True,
        input_fps=30.0,
        items=items,
        steps=steps,
        memory=memory,
        health=health,
        fits=fits,
        shutdown=shutdown,
        recommended_max_sessions=6,
    )


def test_terminal_lines_list_items_reasons_and_verdict() -> None:
    lines = terminal_lines(_result())
    assert lines[0] == "PASS  memory  base 2.0 GiB, 3.0 GiB per session on gpu0"
    assert lines[1] == "FAIL  throughput  3 sessions: min 25.1 fps — below 28.5 fps (95 % of 30)"
    assert lines[-1] == "1 of 5 checks failed"
    recommendation = lines[-2]
    assert recommendation.startswith("recommended --max-sessions 6")
    assert "gpu0" in recommendation
    assert not any("\x1b[" in line for line in lines)


def test_terminal_lines_in_colour_and_all_passed() -> None:
    result = _result()
    result.items = [item for item in result.items if item.passed]
    plain = terminal_lines(result)
    assert plain[-1] == "all checks passed"
    coloured = terminal_lines(result, color=True)
    assert "\x1b[32mPASS\x1b[0m  memory" in coloured[0]
    assert len(coloured) == len(plain)


def test_terminal_lines_explain_a_missing_recommendation() -> None:
    result = _result()
    result.recommended_max_sessions = None
    gpu = result.fits[1]
    result.fits[1] = MemoryFit(
        "gpu0", 23 * GIB, gpu.per_session, 0, gpu.points, GPU_TOTAL, "NVML", GPU_TOTAL // 10, None
    )
    line = terminal_lines(result)[-2]
    assert line.startswith("no recommended --max-sessions")
    assert "gpu0 has" in line
    assert "less than one session" in line

    result.fits = []
    assert "not measured" in terminal_lines(result)[-2]


def test_json_keeps_every_number(tmp_path: Path) -> None:
    result = _result()
    path = tmp_path / "out" / "check.json"
    write_json(result, path)
    data = json.loads(path.read_text(encoding="utf-8"))

    assert data["passed"] is False
    assert data["recommended_max_sessions"] == 6
    rss, gpu = data["fits"]
    assert rss["per_session"] == PER_SESSION_RSS
    assert rss["points"] == [[n, BASE_RSS + PER_SESSION_RSS * n] for n in range(4)]
    assert gpu["recommended_max_sessions"] == 6
    assert data["memory"][120]["gpu_used"] == {"0": BASE_GPU + PER_SESSION_GPU * 2}
    assert data["steps"][2]["peak_gpu_used"] == {"0": BASE_GPU + PER_SESSION_GPU * 3}
    assert data["steps"][0]["latency_ms_p99"] == 81.25
    assert data["health"][200] == {"t": 50.0, "latency_ms": 1800.0, "status": 503}
    assert data["items"][1]["reason"] == "below 28.5 fps (95 % of 30)"
    assert data["shutdown"][2]["last_segment_complete"] is False
    assert path.read_text(encoding="utf-8").startswith("{\n  ")  # pretty-printed


def test_json_replaces_non_finite_numbers(tmp_path: Path) -> None:
    result = _result()
    result.items[0] = ItemResult("memory", True, "ok", figures={"slope": float("nan"), "ids": (1, 2)})
    write_json(result, tmp_path / "check.json")
    figures = json.loads((tmp_path / "check.json").read_text(encoding="utf-8"))["items"][0]["figures"]
    assert figures == {"slope": None, "ids": [1, 2]}


def test_report_writes_html_markdown_and_plots(tmp_path: Path) -> None:
    result = _result(summary_of_metrics="<script>alert(1)</script> & more")
    directory = tmp_path / "report"
    paths = write_report(result, directory)

    names = {path.name for path in paths}
    assert names == {"index.html", "report.md", "memory.png", "health.png", "fps.png"}
    assert all(path.parent == directory and path.is_file() for path in paths)
    for name in ("memory.png", "health.png", "fps.png"):
        png = (directory / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(png) > 10_000
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []  # nothing left in pyplot's global state

    page = (directory / "index.html").read_text(encoding="utf-8")
    for name in ("memory.png", "health.png", "fps.png"):
        assert f'<img src="{name}"' in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert '<td class="fail">FAIL</td><td>throughput</td>' in page
    assert "below 28.5 fps (95 % of 30)" in page
    assert "recommended --max-sessions 6" in page
    assert "floor((total \u2212 headroom \u2212 base) / per-session peak)" in page
    assert "check-2" in page
    assert "http" not in page.replace(result.container_url, "")  # nothing fetched from elsewhere

    markdown = (directory / "report.md").read_text(encoding="utf-8")
    for name in ("memory.png", "health.png", "fps.png"):
        assert f"]({name})" in markdown
    assert "| FAIL | throughput |" in markdown
    assert "<script>" not in markdown
    assert "recommended --max-sessions 6" in markdown


def test_report_with_nothing_measured_still_writes_every_file(tmp_path: Path) -> None:
    result = CheckResult(
        processor="p:P", container_url="http://x", started_at="2025-01-01T00:00:00Z", gpu=False
    )
    paths = write_report(result, tmp_path)
    assert len(paths) == 5
    assert all(path.stat().st_size > 0 for path in paths)
    assert "no checks ran" in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_report_without_matplotlib_raises_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"pip install 'byoc-runtime\[report\]'"):
        write_report(_result(), tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_leak_threshold_is_four_leftovers_per_session_rounded_up_to_50_mib() -> None:
    # 3 sessions left 288 MiB: 96 per session, 4 times is 384, rounded up to 400
    assert leak_threshold_mb(288 * MIB, 3, 64 * MIB) == 400
    assert leak_threshold_mb(300 * MIB, 3, 64 * MIB) == 400  # exactly 400: no rounding
    assert leak_threshold_mb(301 * MIB, 3, 64 * MIB) == 450
    assert leak_threshold_mb(30 * MIB, 3, 64 * MIB) == 100  # never below 100 MiB
    assert leak_threshold_mb(120 * MIB, 1, 640 * MIB) == 650  # never below the leak tolerance
    assert recycle_after_sessions(400, 288 * MIB, 3) == 4  # 400 MiB of 96 MiB leaks
    assert recycle_after_sessions(100, 0, 3) == 1


def test_isolation_item_passes_when_memory_came_back() -> None:
    item = isolation_item(
        "thread", per_session=128 * MIB, workers_per_session=None, leftover=5 * MIB, tolerance=64 * MIB,
        sessions=3,
    )  # fmt: skip
    assert item.passed
    assert item.reason is None
    assert item.summary == (
        "isolation thread: 128.0 MiB per session; memory came back: +5 MiB after 3 sessions ended "
        "(tolerance 64 MiB)"
    )
    assert item.figures["recommended_leak_threshold_mb"] is None


def test_isolation_item_in_thread_mode_recommends_process_isolation_with_a_threshold() -> None:
    item = isolation_item(
        "thread", per_session=97 * MIB, workers_per_session=None, leftover=288 * MIB, tolerance=64 * MIB,
        sessions=3,
    )  # fmt: skip
    assert not item.passed
    assert "memory did not come back: +288 MiB after 3 sessions ended (tolerance 64 MiB)" in item.summary
    assert item.reason is not None
    assert "run with --isolation process --leak-threshold-mb 400 so that" in item.reason
    assert "4 times the 96 MiB left per session" in item.reason
    assert item.figures["recommended_leak_threshold_mb"] == 400
    assert item.figures["recommended_recycle_after_sessions"] is None

    result = _result()
    result.items.append(item)
    line = terminal_lines(result)[len(result.items) - 1]
    assert line.startswith("FAIL  isolation  isolation thread: 97.0 MiB per session; memory did not come")
    assert line.endswith(item.reason)


def test_isolation_item_in_process_mode_recommends_the_threshold_alone() -> None:
    item = isolation_item(
        "process", per_session=100 * MIB, workers_per_session=96 * MIB, leftover=288 * MIB,
        tolerance=64 * MIB, sessions=3,
    )  # fmt: skip
    assert not item.passed
    assert item.summary.startswith(
        "isolation process: workers 96.0 MiB per session (container and workers 100.0 MiB); memory did not"
    )
    assert item.reason is not None
    assert "run with --leak-threshold-mb 400 (or --recycle-after-sessions 4)" in item.reason
    assert "--isolation" not in item.reason
    assert item.figures["recommended_recycle_after_sessions"] == 4

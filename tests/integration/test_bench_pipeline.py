"""The pipeline benchmark runs end to end on its default input, ffmpeg-made H.264 + AAC (its CPU and
latency figures are for the README, not asserted here; what came out is)."""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
from pathlib import Path


def test_bench_pipeline_reports_both_measurements_and_the_audio(tmp_path: Path) -> None:
    """--profile-session makes it one run (three by default)."""
    profile = tmp_path / "session.prof"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "byoc", "bench", "pipeline", "--seconds", "2", "--json"),
            *("--profile-session", str(profile)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["frames_in"] == 60
    assert report["frames_out"] == 60
    assert report["audio_packets_out"] > 0
    # all the audio, give or take one 20 ms Opus frame a (1 s) segment
    assert abs(report["audio_seconds_out"] - report["audio_seconds_in"]) <= 0.02 * report["seconds"]
    assert report["session_cpu_ms_per_frame"] > 0
    assert report["raw_cpu_ms_per_frame"] > 0
    assert abs(report["ratio"] - report["session_cpu_ms_per_frame"] / report["raw_cpu_ms_per_frame"]) < 0.01
    assert report["thread_cpu_ms_per_frame"]["decode"] > 0  # the media thread, by name
    assert report["added_latency_ms_p50"] > 0
    # the session's event loop, profiled: its iterations and the input segments it heard of are counted
    counted = {name: calls for (_, _, name), (_, calls, *_) in pstats.Stats(str(profile)).stats.items()}  # type: ignore[attr-defined]
    assert counted["_run_once"] > 0
    assert counted["_input_segment"] == 2


def test_bench_pipeline_runs_three_times_and_reports_every_run_and_their_median_ratio() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "byoc", "bench", "pipeline", "--seconds", "1", "--input", "aac", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ratios = sorted(run["ratio"] for run in report["runs"])
    assert len(ratios) == 3
    assert all(run["frames_out"] == run["frames_in"] == 30 for run in report["runs"])
    assert all(run["input"].startswith("ffmpeg h264-aac:") for run in report["runs"])  # aac: the default
    assert (report["ratio_min"], report["ratio_median"], report["ratio_max"]) == tuple(ratios)


def test_bench_pipeline_refuses_a_run_count_below_one() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "byoc", "bench", "pipeline", "--runs", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--runs must be at least 1" in result.stderr

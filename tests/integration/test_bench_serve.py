"""The serve benchmark runs end to end on its default input, ffmpeg-made H.264 + AAC, against a real
``byoc serve`` subprocess (its speed figures are for the README, not asserted here; what it accounted
for is)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_serve_reports_a_step_and_the_codec_floor() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "byoc", "bench", "serve", "--sessions", "1", "--seconds", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["floor_ms"] > 0
    [step] = report["steps"]
    assert step["sessions"] == 1
    assert step["frames_out"] > 0
    assert step["audio_packets_out"] > 0
    assert step["cpu_cores"] > 0
    assert step["health_failures"] == 0
    assert step["floor_cores"] == pytest.approx(30 * report["floor_ms"] / 1000, rel=0.01)  # ~30 fps in

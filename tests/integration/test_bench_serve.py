"""The serve benchmark runs end to end on its default input, ffmpeg-made H.264 + AAC, against a real
``byoc serve`` subprocess (its speed figures are for the README, not asserted here; what it accounted
for is)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys

import pytest

from byoc.dev.bench.inputs import bench_input
from byoc.dev.bench.pipeline import raw_live_cpu_ms_per_frame
from byoc.dev.bench.serve import container_encoder_settings


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


def test_the_codec_floor_is_measured_with_the_containers_own_encoder_settings() -> None:
    environ = {"BYOC_PRESET": "veryfast", "BYOC_AUDIO_COMPLEXITY": "3"}
    settings = container_encoder_settings(["passthrough"], environ)
    assert (settings.preset, settings.audio_complexity) == ("veryfast", 3)
    source = bench_input("h264-aac", 1)
    data = b"".join(b"".join(chunks) for chunks in source.segments)
    _, frames = asyncio.run(raw_live_cpu_ms_per_frame(data, source.fps, settings))
    assert frames == 30
    # the raw loop's process encodes with what it is given: a preset libx264 does not know fails it
    with pytest.raises(RuntimeError, match="failed"):
        asyncio.run(raw_live_cpu_ms_per_frame(data, source.fps, dataclasses.replace(settings, preset="none")))

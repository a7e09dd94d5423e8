"""``--codec`` end to end on this machine: real sessions with ``cpu`` and ``auto``, ``nvidia`` refused at
start-up where NVDEC/NVENC do not work, and the fall-back to software when an NVIDIA codec fails."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
import threading

import aiohttp
import pytest

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.trickle_server import RunningTrickle
from byoc.media.codecs import ChosenCodecs, probe_codec
from byoc.media.decoder import Decoder
from byoc.media.encoder import Encoder, EncoderSettings
from byoc.media.items import Item
from byoc.media.queues import StageQueue
from byoc.session import Session
from byoc.spec import EndReason, SessionSettings
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.support import StreamHarness, decode, first_video_is_keyframe, make_segments

# a latency budget no frame can exceed: every frame must come out however busy the machine
SETTINGS = SessionSettings(
    trickle=TEST_CLIENT_SETTINGS, status_interval_s=0.5, drain_timeout_s=3.0, latency_budget_s=60.0
)
NVIDIA_WORKS = probe_codec("h264_nvenc") is None or probe_codec("h264_cuvid") is None


@pytest.fixture(scope="module")
def segments() -> list[list[bytes]]:
    return make_segments(2)


@pytest.mark.parametrize("codec", ["cpu", "auto"])
async def test_a_session_runs_with_the_codec_setting(
    trickle: RunningTrickle, http: aiohttp.ClientSession, segments: list[list[bytes]], codec: str
) -> None:
    settings = dataclasses.replace(SETTINGS, encoder=EncoderSettings(codec=codec))
    async with StreamHarness(trickle, http) as h:
        session = Session(h.spec(), PassthroughProcessor(), http, settings)
        run = asyncio.create_task(session.run())
        await session.wait_started()
        await h.publish(segments)
        await h.input.close()
        assert await asyncio.wait_for(run, 10) == EndReason.INPUT_ENDED
        await h.readers_done()
    frames, _ = decode(h.output_bytes())
    assert [f.index for f in frames] == list(range(60))
    assert h.output
    assert all(first_video_is_keyframe(segment.data) for segment in h.output)


@pytest.mark.skipif(NVIDIA_WORKS, reason="NVDEC/NVENC work on this machine")
def test_serve_with_codec_nvidia_is_refused_at_start_up_here() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "byoc", "serve", "--codec", "nvidia", "--port", "0", "--host", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "byoc serve: --codec nvidia needs h264_nvenc and h264_cuvid, but " in done.stderr
    assert "h264_nvenc" in done.stderr.split("but", 1)[1]  # what is missing, and why


@pytest.mark.skipif(NVIDIA_WORKS, reason="NVDEC/NVENC work on this machine")
def test_auto_logs_its_choice_once_per_process_with_the_reason() -> None:
    script = (
        "import logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from byoc.media.codecs import codecs_for\n"
        "print(codecs_for('auto').encoder); print(codecs_for('auto').encoder)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == ["libx264", "libx264"]
    lines = [line for line in done.stderr.splitlines() if "video codecs" in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("INFO video codecs (--codec auto): chosen: CPU (libx264, software decoders): ")
    assert "h264_nvenc failed to open: " in lines[0] or "h264_nvenc not in this PyAV build" in lines[0]


class _Sink:
    def __init__(self) -> None:
        self.segments: dict[int, bytearray] = {}
        self.closed = threading.Event()

    def write(self, segment: int, data: bytes) -> None:
        self.segments.setdefault(segment, bytearray()).extend(data)

    def flush(self) -> None:
        pass

    def end(self, segment: int, frames: int) -> None:
        pass

    def close(self) -> None:
        self.closed.set()


async def _transcode(segments: list[list[bytes]], decoding: ChosenCodecs, encoding: ChosenCodecs) -> _Sink:
    """The decoder stage straight into the encoder stage, with the codecs given."""
    queue: StageQueue[Item] = StageQueue(capacity=1000, budget_s=1000.0)
    sink = _Sink()
    decoder = Decoder(queue, width=512, height=512, codec=decoding)
    encoder = Encoder(queue, sink, EncoderSettings(codec="cpu"), codecs=encoding)
    decoder.start()
    encoder.start()
    for segment in segments:
        for chunk in segment:
            await decoder.feed(chunk)
        decoder.end_segment()
    decoder.end()
    assert await asyncio.to_thread(decoder.join, 20)
    assert await asyncio.to_thread(encoder.join, 20)
    assert (decoder.error, encoder.error) == (None, None)
    return sink


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


@pytest.mark.skipif(probe_codec("h264_cuvid") is None, reason="NVDEC works on this machine")
async def test_nvdec_that_fails_gives_way_to_software_with_one_warning(
    segments: list[list[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    nvdec = ChosenCodecs("auto", "libx264", {"h264": "h264_cuvid"})
    with caplog.at_level(logging.WARNING, logger="byoc.media"):
        sink = await _transcode(segments, nvdec, ChosenCodecs("cpu"))
    frames, _ = decode(b"".join(bytes(data) for data in sink.segments.values()))
    assert [f.index for f in frames] == list(range(60))
    assert len(_warnings(caplog, "h264_cuvid failed")) == 1


@pytest.mark.skipif(probe_codec("h264_nvenc") is None, reason="NVENC works on this machine")
async def test_nvenc_that_fails_to_open_gives_way_to_libx264(
    segments: list[list[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="byoc.media"):
        sink = await _transcode(segments, ChosenCodecs("cpu"), ChosenCodecs("auto", "h264_nvenc"))
    frames, _ = decode(b"".join(bytes(data) for data in sink.segments.values()))
    assert [f.index for f in frames] == list(range(60))
    assert all(first_video_is_keyframe(bytes(data)) for data in sink.segments.values())
    assert _warnings(caplog, "h264_nvenc failed to open") != []

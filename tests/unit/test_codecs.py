"""The choice of video codecs (byoc/media/codecs.py): probes made controllable, and the real ones here."""

from __future__ import annotations

from collections.abc import Mapping

import av
import pytest

from byoc.errors import ConfigError
from byoc.media.codecs import ChosenCodecs, Probe, choose_codecs, probe_codec
from byoc.media.decoder import FrameFitter
from byoc.media.encoder import EncoderSettings, nvenc_options
from byoc.serve.config import Settings


def probes(**answers: str | None) -> dict[str, str | None]:
    """Every NVIDIA codec opens, except those given a reason."""
    return {"h264_nvenc": None, "h264_cuvid": None, "hevc_cuvid": None, **answers}


def fake(answers: Mapping[str, str | None]) -> tuple[list[str], Probe]:
    asked: list[str] = []

    def probe(name: str) -> str | None:
        asked.append(name)
        return answers[name]

    return asked, probe


def test_cpu_never_probes_and_uses_software() -> None:
    asked, probe = fake(probes())
    chosen = choose_codecs("cpu", probe)
    assert asked == []
    assert (chosen.encoder, chosen.decoder_for("h264"), chosen.decoder_for("hevc")) == (
        "libx264",
        "h264",
        "hevc",
    )


def test_auto_takes_nvidia_when_every_probe_passes() -> None:
    _, probe = fake(probes())
    chosen = choose_codecs("auto", probe)
    assert chosen.encoder == "h264_nvenc"
    assert [chosen.decoder_for(c) for c in ("h264", "hevc", "mpeg2video")] == [
        "h264_cuvid",
        "hevc_cuvid",
        "mpeg2video",
    ]
    assert chosen.reason == "chosen: NVIDIA (h264_cuvid, hevc_cuvid, h264_nvenc)"


@pytest.mark.parametrize(
    "why",
    ["h264_nvenc not in this PyAV build", "h264_nvenc failed to open: no CUDA-capable device"],
)
def test_auto_without_nvenc_encodes_on_the_cpu_and_says_why(why: str) -> None:
    _, probe = fake(probes(h264_nvenc=why))
    chosen = choose_codecs("auto", probe)
    assert chosen.encoder == "libx264"
    assert chosen.decoder_for("h264") == "h264_cuvid"  # the decoder is chosen on its own
    assert why in chosen.reason
    assert "libx264" in chosen.reason


def test_auto_without_nvdec_still_encodes_with_nvenc() -> None:
    why = "h264_cuvid failed to open: CUDA_ERROR_NO_DEVICE"
    _, probe = fake(probes(h264_cuvid=why, hevc_cuvid="hevc_cuvid not in this PyAV build"))
    chosen = choose_codecs("auto", probe)
    assert (chosen.encoder, chosen.decoder_for("h264"), chosen.decoder_for("hevc")) == (
        "h264_nvenc",
        "h264",
        "hevc",
    )
    assert chosen.reason.startswith("chosen: NVIDIA (h264_nvenc)")
    assert why in chosen.reason


def test_auto_with_nothing_is_the_cpu() -> None:
    none = {name: f"{name} not in this PyAV build" for name in probes()}
    _, probe = fake(none)
    chosen = choose_codecs("auto", probe)
    assert chosen == ChosenCodecs("auto", "libx264", {}, chosen.reason)
    assert chosen.reason.startswith("chosen: CPU (libx264, software decoders): ")
    assert all(why in chosen.reason for why in none.values())


@pytest.mark.parametrize(
    ("answers", "missing"),
    [
        (
            probes(h264_nvenc="h264_nvenc failed to open: out of memory"),
            "h264_nvenc failed to open: out of memory",
        ),
        (probes(h264_cuvid="h264_cuvid not in this PyAV build"), "h264_cuvid not in this PyAV build"),
    ],
)
def test_nvidia_without_nvenc_or_nvdec_is_a_config_error_naming_it(
    answers: dict[str, str | None], missing: str
) -> None:
    _, probe = fake(answers)
    with pytest.raises(ConfigError, match="--codec nvidia needs h264_nvenc and h264_cuvid") as raised:
        choose_codecs("nvidia", probe)
    assert missing in str(raised.value)


def test_nvidia_does_without_hevc_decoding() -> None:
    _, probe = fake(probes(hevc_cuvid="hevc_cuvid failed to open: unsupported"))
    chosen = choose_codecs("nvidia", probe)
    assert (chosen.encoder, chosen.decoder_for("h264"), chosen.decoder_for("hevc")) == (
        "h264_nvenc",
        "h264_cuvid",
        "hevc",
    )


def test_an_unknown_preference_is_refused() -> None:
    with pytest.raises(ValueError, match="codec must be one of auto, cpu, nvidia"):
        choose_codecs("gpu")
    with pytest.raises(ValueError, match="codec must be one of"):
        EncoderSettings(codec="gpu")


# --- the real probes on this machine ------------------------------------------------------------------

needs_no_nvenc = pytest.mark.skipif(probe_codec("h264_nvenc") is None, reason="NVENC works on this machine")


def test_the_probe_tells_absent_from_failing_to_open() -> None:
    assert probe_codec("no_such_codec") == "no_such_codec not in this PyAV build"
    assert probe_codec("libx264") is None  # present, and opens


@needs_no_nvenc
def test_auto_here_is_the_cpu_and_says_why() -> None:
    chosen = choose_codecs("auto")
    assert chosen.encoder == "libx264"
    if "h264_nvenc" in av.codecs_available:
        assert "h264_nvenc failed to open: " in chosen.reason
    else:
        assert "h264_nvenc not in this PyAV build" in chosen.reason


@needs_no_nvenc
def test_nvidia_here_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match="--codec nvidia needs h264_nvenc"):
        Settings(codec="nvidia")
    assert Settings(codec="cpu").session().encoder.codec == "cpu"
    assert Settings().encoder().codec == "auto"


@pytest.mark.skipif("h264_nvenc" not in av.codecs_available, reason="no h264_nvenc in this PyAV build")
def test_nvenc_options_are_options_nvenc_knows() -> None:
    """Every option given to NVENC is one of its own (or a generic one), with a value it accepts:
    checked against this PyAV build's FFmpeg without opening NVENC."""
    context = av.CodecContext.create("h264_nvenc", "w")
    supported = context.supported_options
    known = {option.name: option for option in (*supported.generic, *supported.private)}
    options = nvenc_options(EncoderSettings(segment_s=1.0, fps=30, crf=27))
    assert (options["forced-idr"], options["bf"], options["g"]) == ("1", "0", "30")
    for name, value in options.items():
        assert name in known, name
        choices = {choice.name for choice in known[name].choices}
        if choices and not value.lstrip("-").isdigit():
            assert value in choices, (name, value, choices)


@pytest.mark.parametrize("size", [(512, 512), (640, 360)])
def test_nvdec_frames_come_out_as_yuv420p(size: tuple[int, int]) -> None:
    frame = av.VideoFrame(*size, "nv12")
    for plane in frame.planes:
        plane.update(bytes([128]) * plane.buffer_size)
    frame.pts = 3000
    fitted = FrameFitter(512, 512).fit(frame)
    assert (fitted.format.name, fitted.width, fitted.height, fitted.pts) == ("yuv420p", 512, 512, 3000)

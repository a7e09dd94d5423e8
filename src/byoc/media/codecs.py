"""Which video codec implementations the media stages use: software, or NVIDIA's NVDEC/NVENC.

``--codec`` (docs/architecture.md, "Codecs") is a preference: ``cpu`` always decodes with FFmpeg's
software decoders and encodes with libx264; ``nvidia`` requires ``h264_cuvid`` (NVDEC) and
``h264_nvenc`` (NVENC) and is a :class:`ConfigError` at start-up when either is missing; ``auto`` takes
each of them where it works and software elsewhere, decoder and encoder independently.

A codec "works" when PyAV's FFmpeg build has it and opening it on this machine succeeds (without a GPU
the open fails). Each codec is probed once per process (:func:`probe_codec`); :func:`codecs_for` keeps
the choice per preference and logs it, with the reason, the first time it is used. Audio is not
affected (always libopus).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import av

from byoc.errors import ConfigError

__all__ = [
    "NVIDIA_DECODERS",
    "NVIDIA_ENCODER",
    "PREFERENCES",
    "SOFTWARE_ENCODER",
    "ChosenCodecs",
    "Probe",
    "choose_codecs",
    "codecs_for",
    "probe_codec",
]

log = logging.getLogger(__name__)

PREFERENCES = ("auto", "cpu", "nvidia")
SOFTWARE_ENCODER = "libx264"
NVIDIA_ENCODER = "h264_nvenc"
NVIDIA_DECODERS: Mapping[str, str] = {"h264": "h264_cuvid", "hevc": "hevc_cuvid"}
"""The NVDEC decoder for an input codec (its FFmpeg name, as the PMT gives it)."""
_REQUIRED_DECODER = NVIDIA_DECODERS["h264"]  # what ``nvidia`` cannot do without; hevc_cuvid is a bonus
_PROBE_SIZE = (256, 256)  # above NVENC's smallest frame on every GPU generation

Probe = Callable[[str], str | None]
"""A codec name to None when it opens on this machine, else why not (one line)."""


@dataclass(frozen=True, slots=True)
class ChosenCodecs:
    """The video codecs one preference resolved to."""

    preference: str
    encoder: str = SOFTWARE_ENCODER
    decoders: Mapping[str, str] = field(default_factory=dict)
    """Input codec -> hardware decoder; an input codec not named here is decoded in software."""
    reason: str = ""

    def decoder_for(self, codec: str) -> str:
        """The decoder name for input ``codec`` (its own name: FFmpeg's software decoder)."""
        return self.decoders.get(codec, codec)

    @property
    def nvidia_encoding(self) -> bool:
        return self.encoder == NVIDIA_ENCODER


def _is_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except Exception:
        return False
    return True


@functools.cache
def probe_codec(name: str) -> str | None:
    """None when codec ``name`` is in PyAV's FFmpeg build and opens here, else why not. Once per
    process and name: opening a hardware codec creates a GPU context, which takes a moment."""
    if name not in av.codecs_available:
        return f"{name} not in this PyAV build"
    encoder = _is_encoder(name)
    try:
        context = av.CodecContext.create(name, "w" if encoder else "r")
        if encoder:
            assert isinstance(context, av.VideoCodecContext)
            context.width, context.height = _PROBE_SIZE
            context.pix_fmt = "yuv420p"
            context.time_base = Fraction(1, 30)
        context.open()
    except Exception as exc:
        return f"{name} failed to open: {exc}"
    del context  # closed when freed: no GPU context is kept for the probe
    return None


def choose_codecs(preference: str, probe: Probe = probe_codec) -> ChosenCodecs:
    """The codecs ``preference`` (``auto``, ``cpu`` or ``nvidia``) resolves to, asking ``probe``
    whether each NVIDIA codec works. ``nvidia`` without NVENC or NVDEC (h264) is a ConfigError that
    names what is missing; ValueError for an unknown preference."""
    if preference not in PREFERENCES:
        raise ValueError(f"codec must be one of {', '.join(PREFERENCES)}, got {preference!r}")
    if preference == "cpu":
        reason = f"chosen: CPU ({SOFTWARE_ENCODER}, software decoders) by --codec cpu"
        return ChosenCodecs(preference, reason=reason)
    encoder_problem = probe(NVIDIA_ENCODER)
    decoder_problems = {codec: probe(name) for codec, name in NVIDIA_DECODERS.items()}
    decoders = {
        codec: NVIDIA_DECODERS[codec] for codec, problem in decoder_problems.items() if problem is None
    }
    if preference == "nvidia":
        missing = [p for p in (encoder_problem, decoder_problems["h264"]) if p is not None]
        if missing:
            raise ConfigError(
                f"--codec nvidia needs {NVIDIA_ENCODER} and {_REQUIRED_DECODER}, but "
                + "; ".join(missing)
                + " (use --codec auto or cpu)"
            )
    encoder = SOFTWARE_ENCODER if encoder_problem is not None else NVIDIA_ENCODER
    used = [*decoders.values(), encoder] if encoder == NVIDIA_ENCODER else [*decoders.values()]
    problems = [p for p in (*decoder_problems.values(), encoder_problem) if p is not None]
    if not used:
        reason = f"chosen: CPU ({SOFTWARE_ENCODER}, software decoders): " + "; ".join(problems)
    else:
        reason = f"chosen: NVIDIA ({', '.join(used)})"
        if encoder != NVIDIA_ENCODER:
            reason += f", {SOFTWARE_ENCODER}"
        if problems:
            reason += "; software where not: " + "; ".join(problems)
    return ChosenCodecs(preference, encoder, decoders, reason)


_chosen: dict[str, ChosenCodecs] = {}
_announced: set[str] = set()
_lock = threading.Lock()


def codecs_for(preference: str, *, announce: bool = True) -> ChosenCodecs:
    """:func:`choose_codecs` with the real probes, kept per preference for the whole process. The
    first use with ``announce`` logs the choice and its reason (INFO); start-up validation passes
    ``announce=False`` because logging is not set up yet then."""
    with _lock:
        chosen = _chosen.get(preference)
        if chosen is None:
            chosen = _chosen[preference] = choose_codecs(preference)
        if announce and preference not in _announced:
            _announced.add(preference)
            log.info("video codecs (--codec %s): %s", preference, chosen.reason)
    return chosen

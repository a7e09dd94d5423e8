"""Media made by a third party: the ffmpeg command-line tool, cut by its own segment muxer.

Nothing here is committed media: every case is generated on first use into a cache folder
(``$BYOC_CORPUS_DIR``, else ``byoc-corpus`` in the temporary directory) from a recipe, the way a
gateway's ffmpeg makes its input: lavfi test sources, libx264 / AAC and friends, ``-f segment`` into
MPEG-TS segments. The ffmpeg binary is the system's (``ffmpeg`` on PATH) or the one the
``imageio-ffmpeg`` package ships; without either, :func:`ffmpeg` raises :class:`FfmpegNotFound`.

The benchmarks take their ``--input`` from :data:`CASES`; the test suite adds its own cases (damaged
and switching streams) to the same dictionary.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CASES",
    "HEVC",
    "PTS_WRAP",
    "START_PTS",
    "TS_PACKET",
    "X264",
    "Case",
    "FfmpegNotFound",
    "ffmpeg",
    "later",
    "segments",
    "x264",
]

TS_PACKET = 188
PTS_WRAP = 1 << 33
START_PTS = 126_000
"""Where ffmpeg's MPEG-TS muxer starts its timestamps (1.4 s)."""


class FfmpegNotFound(RuntimeError):
    """Neither an ``ffmpeg`` on PATH nor the ``imageio-ffmpeg`` package is available."""


@functools.cache
def ffmpeg() -> str:
    """The ffmpeg executable: the system's, else imageio-ffmpeg's."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        raise FfmpegNotFound(
            "the corpus inputs are made with ffmpeg, which was not found: install it with "
            "`pip install imageio-ffmpeg` (a static ffmpeg build in a Python package) or your system's "
            "ffmpeg package (e.g. `apt-get install ffmpeg`), so that `ffmpeg` is on PATH"
        ) from None
    return str(imageio_ffmpeg.get_ffmpeg_exe())


def x264(*more: str, gop: int = 30, profile: str = "high") -> tuple[str, ...]:
    """libx264 arguments: ``profile``, a keyframe every ``gop`` frames, then ``more``."""
    return ("-c:v", "libx264", "-profile:v", profile, "-preset", "veryfast", "-g", str(gop), *more)


X264 = x264("-bf", "0")
"""H.264 as gateways send it: High profile, a keyframe a second, no B-frames."""


@dataclass(frozen=True)
class Case:
    """One input as a gateway could send it: ffmpeg arguments between the sources and the segmenter."""

    name: str
    seconds: float = 3.0
    size: str = "512x512"
    rate: int = 30
    video: Sequence[str] | None = X264
    audio: Sequence[str] | None = ("-c:a", "aac", "-ar", "48000", "-ac", "2", "-b:a", "96k")
    segment_s: float = 1.0
    extra: Sequence[str] = field(default=())
    parts: Sequence[Case] = ()
    """When given, the case is these cases' segments one after the other (a switch mid-stream)."""
    post: Callable[[list[bytes]], list[bytes]] | None = None
    """Applied to the segments as ffmpeg (or ``parts``) made them: re-cut, shifted, damaged."""

    @property
    def frames(self) -> int:
        if self.parts:
            return sum(part.frames for part in self.parts)
        return round(self.seconds * self.rate) if self.video is not None else 0

    @property
    def duration(self) -> float:
        """Seconds of media in the case."""
        return sum(part.duration for part in self.parts) if self.parts else self.seconds

    def command(self, out_pattern: str) -> list[str]:
        sources = []
        if self.video is not None:
            sources += ["-f", "lavfi", "-i", f"testsrc2=size={self.size}:rate={self.rate}"]
        if self.audio is not None:
            sources += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
        args = [ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", *sources, "-t", str(self.seconds)]
        args += [*(self.video if self.video is not None else ["-vn"])]
        args += [*(self.audio if self.audio is not None else ["-an"]), *self.extra]
        args += ["-f", "segment", "-segment_time", str(self.segment_s), "-reset_timestamps", "0"]
        return [*args, "-segment_format", "mpegts", out_pattern]


def later(case: Case, seconds: float) -> Case:
    """``case`` with its timestamps ``seconds`` later (the next part of a stream that goes on)."""
    shifted = (*case.extra, "-output_ts_offset", str(seconds))
    return dataclasses.replace(case, name=f"{case.name}@{seconds:g}", extra=shifted)


HEVC = ("-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "keyint=30:bframes=0:log-level=error")

CASES: dict[str, Case] = {
    case.name: case
    for case in (
        # what gateways send, and the audio codecs they may carry
        Case("h264-aac"),
        Case("h264-only", audio=None),
        Case("aac-44k-mono", audio=("-c:a", "aac", "-ar", "44100", "-ac", "1")),
        Case("opus", audio=("-c:a", "libopus", "-ar", "48000", "-ac", "2")),
        Case("mp3", audio=("-c:a", "libmp3lame", "-ar", "44100", "-ac", "2")),
        Case("mp2", audio=("-c:a", "mp2", "-ar", "48000", "-ac", "2")),
        # other encoders' habits
        Case("bframes", video=x264("-bf", "2")),
        Case("open-gop", video=x264("-bf", "2", "-flags", "-cgop", "-x264opts", "open-gop=1")),
        Case(  # 4:2:0 needs even sizes: an odd one is 4:4:4 (or an H.264 crop to an even size)
            "odd-size",
            size="334x258",
            video=x264("-bf", "0", "-vf", "format=yuv444p,crop=333:257", profile="high444"),
        ),
        Case("4k", seconds=2.0, size="3840x2160", rate=5, video=x264("-bf", "0", gop=5)),
        Case(
            "vfr",
            video=(
                *x264("-bf", "0"),
                "-vf",
                "select='not(between(mod(n\\,30)\\,10\\,17))',settb=1/90000,setpts='PTS+random(0)*900'",
                "-fps_mode",
                "passthrough",
                "-enc_time_base:v",
                "1:90000",
            ),
        ),
        Case("audio-only", video=None),
        Case("hevc", video=HEVC),
        Case("mpeg2", video=("-c:v", "mpeg2video", "-g", "30", "-bf", "0", "-q:v", "4")),
    )
}
"""The cases by name. Cases made of ``parts`` refer to other :class:`Case` objects, not to names."""


def _cache_dir() -> Path:
    root = Path(os.environ.get("BYOC_CORPUS_DIR") or Path(tempfile.gettempdir()) / "byoc-corpus")
    root.mkdir(parents=True, exist_ok=True)
    return root


def segments(case: Case | str) -> list[bytes]:
    """The case's MPEG-TS segments, in order (made once, then read from the cache)."""
    case = CASES[case] if isinstance(case, str) else case
    made = [segment for part in case.parts for segment in segments(part)] if case.parts else _made(case)
    return case.post(made) if case.post is not None else made


def _made(case: Case) -> list[bytes]:
    key = hashlib.sha256(repr(case.command("-")).encode()).hexdigest()[:16]
    folder = _cache_dir() / f"{case.name}-{key}"
    if not (folder / "done").exists():
        work = Path(tempfile.mkdtemp(dir=_cache_dir()))
        subprocess.run(case.command(str(work / "seg%04d.ts")), check=True, timeout=120)
        (work / "done").touch()
        try:
            work.rename(folder)
        except OSError:  # made meanwhile by a concurrent run: use that one
            shutil.rmtree(work, ignore_errors=True)
    return [path.read_bytes() for path in sorted(folder.glob("seg*.ts"))]

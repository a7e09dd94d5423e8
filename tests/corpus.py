"""Test media made by a third party: the ffmpeg command-line tool, cut by its own segment muxer.

Nothing here is committed media: every case is generated at test time into a cache folder (one per test
run) from a recipe, the way a gateway's ffmpeg makes its input: lavfi test sources, libx264 / AAC and
friends, ``-f segment`` into MPEG-TS segments. The ffmpeg binary is the system's (``ffmpeg`` on PATH,
as ``.ci/run`` installs it) or, on a fresh machine, the one the ``imageio-ffmpeg`` package ships.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CASES", "Case", "ffmpeg", "segments"]


@functools.cache
def ffmpeg() -> str:
    """The ffmpeg executable: the system's, else imageio-ffmpeg's."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


X264 = ("-c:v", "libx264", "-profile:v", "high", "-preset", "veryfast", "-g", "30", "-bf", "0")
"""H.264 as gateways send it: High profile, a keyframe a second, no B-frames."""


@dataclass(frozen=True)
class Case:
    """One input as a gateway could send it: ffmpeg arguments between the sources and the segmenter."""

    name: str
    seconds: float = 3.0
    size: str = "512x512"
    rate: int = 30
    video: Sequence[str] = (
        "-c:v",
        "libx264",
        "-profile:v",
        "high",
        "-preset",
        "veryfast",
        "-g",
        "30",
        "-bf",
        "0",
    )
    audio: Sequence[str] | None = ("-c:a", "aac", "-ar", "48000", "-ac", "2", "-b:a", "96k")
    segment_s: float = 1.0
    extra: Sequence[str] = field(default=())

    @property
    def frames(self) -> int:
        return round(self.seconds * self.rate)

    def command(self, out_pattern: str) -> list[str]:
        sources = ["-f", "lavfi", "-i", f"testsrc2=size={self.size}:rate={self.rate}"]
        if self.audio is not None:
            sources += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
        args = [ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", *sources, "-t", str(self.seconds)]
        args += [*self.video, *(self.audio if self.audio is not None else ["-an"]), *self.extra]
        args += ["-f", "segment", "-segment_time", str(self.segment_s), "-reset_timestamps", "0"]
        return [*args, "-segment_format", "mpegts", out_pattern]


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("h264-aac"),
        Case("h264-only", audio=None),
        Case("aac-44k-mono", audio=("-c:a", "aac", "-ar", "44100", "-ac", "1")),
        Case("opus", audio=("-c:a", "libopus", "-ar", "48000", "-ac", "2")),
        Case("mp3", audio=("-c:a", "libmp3lame", "-ar", "44100", "-ac", "2")),
        Case("mp2", audio=("-c:a", "mp2", "-ar", "48000", "-ac", "2")),
    )
}


def _cache_dir() -> Path:
    root = Path(os.environ.get("BYOC_CORPUS_DIR") or Path(tempfile.gettempdir()) / "byoc-corpus")
    root.mkdir(parents=True, exist_ok=True)
    return root


def segments(case: Case | str) -> list[bytes]:
    """The case's MPEG-TS segments, in order (made once, then read from the cache)."""
    case = CASES[case] if isinstance(case, str) else case
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

"""The live page's thumbnails (byoc.dev.orchestrator.thumbnails): a segment decoded while it arrives
gives every frame once, and the newest frame becomes a small JPEG."""

from __future__ import annotations

import io

import av

from byoc.dev.orchestrator.thumbnails import SegmentDecoder, jpeg
from byoc.dev.synthetic import SyntheticStream, read_frame_index


def test_a_segment_decoded_while_it_arrives_gives_every_frame_once() -> None:
    chunks = SyntheticStream(width=256, height=256, segment_frames=12).segment()  # one chunk a frame
    decoder = SegmentDecoder()
    newest: list[int | None] = []
    for chunk in chunks:
        decoder.feed(chunk)
        frame = decoder.decode()
        newest.append(None if frame is None else read_frame_index(frame.to_ndarray(format="rgb24")))
    frame = decoder.decode(complete=True)
    assert frame is not None
    assert decoder.frames == 12  # each frame decoded once, none twice
    assert read_frame_index(frame.to_ndarray(format="rgb24")) == 11
    shown = [index for index in newest if index is not None]
    assert shown == sorted(shown)
    assert len(set(shown)) >= 6  # the newest frame moved on while the bytes arrived
    assert shown[-1] < 11  # the last packet waits for more bytes (or the end): it may be cut short


def test_the_thumbnail_is_a_small_jpeg_of_the_frame() -> None:
    chunks = SyntheticStream(width=512, height=288, segment_frames=3).segment()
    decoder = SegmentDecoder()
    decoder.feed(b"".join(chunks))
    frame = decoder.decode(complete=True)
    assert frame is not None
    image = jpeg(frame, width=160)
    assert image.startswith(b"\xff\xd8")
    with av.open(io.BytesIO(image), mode="r") as container:
        decoded = next(container.decode(video=0))
    assert (decoded.width, decoded.height) == (160, 90)
    assert read_frame_index(decoded.to_ndarray(format="rgb24")) == 2

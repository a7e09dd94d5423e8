"""``byoc publish``: feed a stream's input channel from ffmpeg (or any MPEG-TS source).

With the local orchestrator's ``"source": "none"`` the input channel is yours to fill. This bridge
reads MPEG-TS (H.264, any audio) from a file or stdin and publishes it as trickle segments, cutting the
byte stream where a keyframe starts (at the PAT/PMT the muxer writes in front of it) — no re-encoding.
Each segment's bytes leave as they arrive, so pacing is the source's: ``ffmpeg -re`` is real time::

    ffmpeg -re -i input.mp4 -c:v libx264 -preset veryfast -tune zerolatency -g 30 -bf 0 \\
        -c:a aac -f mpegts - | byoc publish - http://127.0.0.1:8935/ai/trickle/STREAM_ID
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from byoc.media.ts import PACKET_SIZE, SYNC_BYTE
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.publisher import PublishSegment, TricklePublisher

__all__ = ["TsSegmenter", "publish_ts"]

_H264 = 0x1B
_PSI = {0x0000, 0x0011}  # PAT, SDT (the PMT PID is learnt from the PAT)


class TsSegmenter:
    """Splits an MPEG-TS byte stream into segments that each start at the tables before a keyframe.

    ``feed(data)`` yields ``(start, bytes)`` pieces in order: ``start`` is True for the first piece of a
    new segment. Bytes before the first keyframe are dropped (a segment must start decodable).
    """

    def __init__(self) -> None:
        self._pending = b""
        self._pmt_pid: int | None = None
        self.video_pid: int | None = None
        self._tables: list[bytes] = []  # PSI packets seen since the last video packet
        self._started = False

    def feed(self, data: bytes) -> Iterator[tuple[bool, bytes]]:
        data = self._pending + data
        usable = len(data) - len(data) % PACKET_SIZE
        self._pending = data[usable:]
        piece = bytearray()
        for offset in range(0, usable, PACKET_SIZE):
            packet = data[offset : offset + PACKET_SIZE]
            if packet[0] != SYNC_BYTE:
                continue
            pid = (packet[1] & 0x1F) << 8 | packet[2]
            if pid == 0x0000:
                self._read_pat(packet)
            elif pid == self._pmt_pid:
                self._read_pmt(packet)
            if pid in _PSI or pid == self._pmt_pid:
                self._tables.append(packet)
                continue
            if pid == self.video_pid and _random_access(packet):
                if piece and self._started:
                    yield False, bytes(piece)
                piece = bytearray(b"".join(self._tables))
                self._tables.clear()
                piece += packet
                self._started = True
                yield True, bytes(piece)
                piece = bytearray()
                continue
            if self._tables:
                piece += b"".join(self._tables)
                self._tables.clear()
            piece += packet
        if piece and self._started:
            yield False, bytes(piece)

    def _read_pat(self, packet: bytes) -> None:
        section = _section(packet)
        if section is not None and len(section) >= 12:
            self._pmt_pid = (section[10] & 0x1F) << 8 | section[11]  # the first program

    def _read_pmt(self, packet: bytes) -> None:
        section = _section(packet)
        if section is None or len(section) < 12:
            return
        length = (section[1] & 0x0F) << 8 | section[2]
        position = 12 + ((section[10] & 0x0F) << 8 | section[11])
        end = min(len(section), 3 + length - 4)
        while position + 5 <= end:
            stream_type, pid = section[position], (section[position + 1] & 0x1F) << 8 | section[position + 2]
            if stream_type == _H264 and self.video_pid is None:
                self.video_pid = pid
            position += 5 + ((section[position + 3] & 0x0F) << 8 | section[position + 4])


def _payload(packet: bytes) -> bytes:
    start = 4
    if packet[3] & 0x20:
        start += 1 + packet[4]
    return packet[start:] if packet[3] & 0x10 else b""


def _section(packet: bytes) -> bytes | None:
    if not packet[1] & 0x40:
        return None
    payload = _payload(packet)
    return payload[1 + payload[0] :] if payload else None


def _random_access(packet: bytes) -> bool:
    return bool(packet[1] & 0x40 and packet[3] & 0x20 and packet[4] and packet[5] & 0x40)


async def _chunks(source: BinaryIO, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    while data := await asyncio.to_thread(source.read1 if hasattr(source, "read1") else source.read, size):
        yield data


async def publish_ts(source: BinaryIO, url: str, settings: TrickleClientSettings | None = None) -> int:
    """Publish MPEG-TS from ``source`` to the trickle channel ``url``; returns the segments sent."""
    segmenter = TsSegmenter()
    sent = 0
    async with create_client_session(settings or TrickleClientSettings()) as http:
        publisher = TricklePublisher(url, session=http, start_seq=-1)
        segment: PublishSegment | None = None
        async for data in _chunks(source):
            for start, piece in segmenter.feed(data):
                if start and segment is not None:
                    await segment.finish()
                    sent += 1
                    segment = None
                if segment is None:
                    segment = publisher.segment()
                    await segment.open()
                await segment.write(piece)
        if segment is not None:
            await segment.finish()
            sent += 1
        await publisher.close()
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="byoc publish", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="an MPEG-TS file, or - for stdin")
    parser.add_argument("url", help="the trickle channel, e.g. http://127.0.0.1:8935/ai/trickle/STREAM_ID")
    parser.add_argument("--insecure-tls", action="store_true", help="do not verify the server's certificate")
    args = parser.parse_args(argv)
    settings = TrickleClientSettings(verify_tls=not args.insecure_tls)
    if args.source == "-":
        sent = asyncio.run(publish_ts(sys.stdin.buffer, args.url, settings))
    else:
        with Path(args.source).open("rb") as source:
            sent = asyncio.run(publish_ts(source, args.url, settings))
    print(f"published {sent} segments to {args.url}", file=sys.stderr)
    return 0

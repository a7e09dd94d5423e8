"""Just enough MPEG-TS at the byte level to release a demuxer's last frames at a segment's end.

FFmpeg's MPEG-TS demuxer cannot know that a video PES without a length is complete until the next
PES on that PID starts, and its H.264 parser holds an access unit until the next access unit
delimiter. So the last one or two frames of every trickle segment stay inside the demuxer until the
next segment's bytes arrive — a full segment later when segments arrive whole. At the end of each
input segment byoc therefore appends two tiny TS packets on the video PID, each a complete PES (its
length is set) holding only an H.264 access unit delimiter, with the discontinuity indicator set so no
continuity error is reported: the first ends the last PES, the second makes the parser let go of the
last access unit. That releases every frame of the segment at once.

The access unit started by the second delimiter takes the next real frame's data but not its timestamp, so
the first frame after a flush comes out without a PTS; :func:`first_video_pts` reads the PTS of the
next segment's first video PES from its bytes so the decoder can restore it.

HEVC gets its own access unit delimiter and MPEG-2 a sequence end code instead (:data:`FLUSH_UNITS`);
H.264 bytes would be damaged data to those decoders. :class:`StreamTypeWatch` follows the PMT, so a
codec that changes mid-stream (an encoder restarted with another one) gets a decoder of its own.
"""

from __future__ import annotations

import re

__all__ = [
    "FLUSH_ACCESS_UNIT",
    "FLUSH_UNITS",
    "PACKET_SIZE",
    "STREAM_TYPES",
    "SYNC_BYTE",
    "StreamTypeWatch",
    "count_pes_starts",
    "first_video_pts",
    "shift_timestamps",
    "video_flush_packets",
]

_WRAP = 1 << 33

PACKET_SIZE = 188
SYNC_BYTE = 0x47

FLUSH_ACCESS_UNIT = b"\x00\x00\x00\x01\x09\xf0"
"""An H.264 access unit delimiter NAL, all that a flush packet carries."""

FLUSH_UNITS = {
    "h264": FLUSH_ACCESS_UNIT,
    "hevc": b"\x00\x00\x00\x01\x46\x01\x50",  # an HEVC access unit delimiter NAL
    "mpeg2video": b"\x00\x00\x01\xb7",  # a sequence end code: the parser lets the last picture go
    "mpeg1video": b"\x00\x00\x01\xb7",
}
"""What a flush packet carries, by the video codec's FFmpeg name; other codecs get no flush packets."""


def video_flush_packets(pid: int, codec: str = "h264") -> bytes:
    """Two TS packets on ``pid``, each carrying only an access unit delimiter (see the module docstring),
    or the codec's equivalent (:data:`FLUSH_UNITS`)."""
    if not 0 <= pid < 0x1FFF:
        raise ValueError(f"invalid PID {pid}")
    unit = FLUSH_UNITS[codec]
    # A complete PES (stream id 0xE0, PES_packet_length set, no PTS) with just that unit.
    pes = b"\x00\x00\x01\xe0" + (3 + len(unit)).to_bytes(2, "big") + b"\x80\x00\x00" + unit
    stuffing = PACKET_SIZE - 4 - 1 - len(pes)  # header, adaptation_field_length, PES
    # adaptation field: flags (discontinuity_indicator), then stuffing bytes
    adaptation = bytes([stuffing, 0x80]) + b"\xff" * (stuffing - 1)
    # sync, payload_unit_start + PID, adaptation field + payload, continuity counter 0
    header = bytes([SYNC_BYTE, 0x40 | (pid >> 8), pid & 0xFF, 0x30])
    packet = header + adaptation + pes
    assert len(packet) == PACKET_SIZE
    return packet * 2


def _pes_pts(payload: bytes) -> int | None:
    """The PTS of a PES whose header starts ``payload``, or None."""
    if len(payload) < 14 or payload[:3] != b"\x00\x00\x01" or not payload[7] & 0x80:
        return None
    p = payload[9:14]
    return ((p[0] >> 1) & 0x07) << 30 | p[1] << 22 | (p[2] >> 1) << 15 | p[3] << 7 | p[4] >> 1


def first_video_pts(data: bytes, pid: int) -> int | None:
    """The PTS of the first PES that starts on ``pid`` in TS-aligned ``data``, if it has one."""
    for offset in range(0, len(data) - PACKET_SIZE + 1, PACKET_SIZE):
        packet = data[offset : offset + PACKET_SIZE]
        if packet[0] != SYNC_BYTE or ((packet[1] & 0x1F) << 8 | packet[2]) != pid:
            continue
        if not packet[1] & 0x40:  # not the start of a PES
            continue
        control = (packet[3] >> 4) & 0x3
        start = 4
        if control & 0x2:  # adaptation field present
            start += 1 + packet[4]
        if not control & 0x1 or start >= PACKET_SIZE:
            continue
        return _pes_pts(packet[start:])
    return None


def count_pes_starts(data: bytes, pid: int) -> int:
    """How many PES packets start on ``pid`` in TS-aligned ``data`` (for video: how many frames)."""
    count = 0
    for offset in range(0, len(data) - PACKET_SIZE + 1, PACKET_SIZE):
        if (
            data[offset] == SYNC_BYTE
            and data[offset + 1] & 0x40
            and ((data[offset + 1] & 0x1F) << 8 | data[offset + 2]) == pid
        ):
            count += 1
    return count


def _read_timestamp(field: bytes | bytearray) -> int:
    return (
        ((field[0] >> 1) & 0x07) << 30
        | field[1] << 22
        | (field[2] >> 1) << 15
        | field[3] << 7
        | field[4] >> 1
    )


def _write_timestamp(packet: bytearray, at: int, value: int) -> None:
    prefix = packet[at] & 0xF0  # '0010', '0011' or '0001' and keep the marker bits
    packet[at] = prefix | ((value >> 29) & 0x0E) | 0x01
    packet[at + 1] = (value >> 22) & 0xFF
    packet[at + 2] = ((value >> 14) & 0xFE) | 0x01
    packet[at + 3] = (value >> 7) & 0xFF
    packet[at + 4] = ((value << 1) & 0xFE) | 0x01


def shift_timestamps(data: bytes, ticks: int) -> bytes:
    """TS-aligned ``data`` with every PCR, PTS and DTS moved by ``ticks`` (90 kHz), e.g. to replay a loop."""
    out = bytearray(data)
    for offset in range(0, len(out) - PACKET_SIZE + 1, PACKET_SIZE):
        if out[offset] != SYNC_BYTE:
            continue
        control = (out[offset + 3] >> 4) & 0x3
        payload = offset + 4
        if control & 0x2:
            length = out[offset + 4]
            if length and out[offset + 5] & 0x10:  # PCR: 33-bit base, 6 reserved bits, 9-bit extension
                at = offset + 6
                base = (
                    out[at] << 25 | out[at + 1] << 17 | out[at + 2] << 9 | out[at + 3] << 1 | out[at + 4] >> 7
                )
                base = (base + ticks) % _WRAP
                out[at : at + 4] = (base >> 1).to_bytes(4, "big")
                out[at + 4] = ((base & 1) << 7) | (out[at + 4] & 0x7F)
            payload += 1 + length
        if not control & 0x1 or not out[offset + 1] & 0x40 or payload + 14 > offset + PACKET_SIZE:
            continue
        if out[payload : payload + 3] != b"\x00\x00\x01":
            continue
        flags = out[payload + 7] >> 6
        if flags & 0x2:  # PTS, and with it maybe a DTS
            for index in range(2 if flags == 3 else 1):
                at = payload + 9 + 5 * index
                _write_timestamp(out, at, (_read_timestamp(out[at : at + 5]) + ticks) % _WRAP)
    return bytes(out)


STREAM_TYPES = {0x01: "mpeg1video", 0x02: "mpeg2video", 0x1B: "h264", 0x24: "hevc"}
"""The PMT's video stream types, by the codec's FFmpeg name."""


def _crc32_mpeg2(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


_START_AND_PID = bytes(byte & 0x5F for byte in range(256))
"""A TS header's second byte -> its payload_unit_start_indicator and PID bits (at most 0x5F)."""


def _headers(highs: bytes, lows: bytes) -> bytearray:
    """Each packet's PID bytes (``highs``: its header's second bytes, ``lows``: the third) as a 3-byte
    entry: 0xFF (which no entry's second byte is, so a match can only start at an entry), the
    payload_unit_start_indicator and high PID bits, the low PID bits."""
    headers = bytearray(b"\xff" * (3 * len(highs)))
    headers[1::3] = highs.translate(_START_AND_PID)
    headers[2::3] = lows
    return headers


def _section_start(pid: int, known: bytes | None) -> bytes:
    """A pattern matching, in the stream's bytes, the header of a packet of ``pid`` that starts a
    payload unit (whatever its transport_error and transport_priority bits), unless the ``known``
    payload follows it; now and then it also matches payload bytes that look like such a header."""
    flags = bytes(0x40 | pid >> 8 | other for other in (0x00, 0x20, 0x80, 0xA0))
    low = re.escape(bytes((pid & 0xFF,)))
    header = bytes((SYNC_BYTE,)) + b"[" + re.escape(flags) + b"]" + low + b"[\x00-\xff]"  # any 4th byte
    return header if known is None else header + b"(?!" + re.escape(known) + b")"


def _pid_entry(pid: int, *, starts: bool) -> bytes:
    """A pattern matching the :func:`_headers` entries of ``pid``'s packets: those that start a payload
    unit (``starts``) or all of them."""
    high, flagged = bytes((pid >> 8,)), bytes((0x40 | pid >> 8,))
    flags = re.escape(flagged) if starts else b"[" + re.escape(high) + re.escape(flagged) + b"]"
    return b"\xff" + flags + re.escape(bytes((pid & 0xFF,)))


class StreamTypeWatch:
    """Follows the PAT and PMT of TS bytes as they go to a demuxer: from which byte offset on the PMT
    names which video codec for a PID. FFmpeg's demuxer switches its parser when the PMT changes a
    stream's type (an encoder restarted with another codec) but a decoder opened for the old codec
    does not know; the offsets tie the change to the demuxed packets (``Packet.pos``).

    A change in a segment's head (before any packet of a stream the PMT lists) counts from the
    segment's boundary: the demuxer dates the segment's first frame from the flush packets before it.
    Only sections that start and end in one TS packet with a valid CRC count (a PMT of a few streams).
    """

    def __init__(self) -> None:
        self._carry = b""
        self._head_of: int | None = 0
        self._pmt_pids: set[int] = set()
        self._latest: dict[int, str] = {}
        self._current: dict[int, str] = {}
        self._changes: list[tuple[int, int, str]] = []
        self._sections: dict[int, bytes] = {}  # the last section packet of each PID (its payload)
        self._watched: re.Pattern[bytes] | None = None  # see _watch()
        self._sections_pattern: re.Pattern[bytes] | None = None  # see _watch_sections()

    def scan(self, data: bytes, offset: int) -> None:
        """``data``, which starts at byte ``offset`` of the stream."""
        data, start, at = self._carry + data, offset - len(self._carry), 0
        while at + PACKET_SIZE <= len(data):
            if data[at] != SYNC_BYTE:
                found = data.find(SYNC_BYTE, at + 1)
                at = found if found >= 0 else len(data)
                continue
            at = self._aligned(data, start, at)
        self._carry = data[at:]

    def _aligned(self, data: bytes, start: int, at: int) -> int:
        """Scan the packets from ``at`` on while they stay aligned; returns where that ended.

        Only the packets that can change something are looked at one by one: where a PAT or PMT
        section starts and, in a segment's head, those of the streams the PMT lists. Regular
        expressions find them (:meth:`_sections_in`, :meth:`_head_in`), rather than a loop over every
        packet (which ran several hundred bytecodes a frame). A section is parsed only when it differs
        from the last one seen on its PID (PAT and PMT repeat unchanged)."""
        end = at + (len(data) - at) // PACKET_SIZE * PACKET_SIZE
        syncs = data[at:end:PACKET_SIZE]
        aligned = len(syncs)
        if syncs.count(SYNC_BYTE) != aligned:
            aligned = next(index for index, byte in enumerate(syncs) if byte != SYNC_BYTE)
        end = at + aligned * PACKET_SIZE
        if self._head_of is None:
            self._sections_in(data, start, at, end)
        else:
            self._head_in(data, start, at, end)
        return end

    def _sections_in(self, data: bytes, start: int, at: int, end: int) -> None:
        """Past a segment's head only PAT and PMT sections count, and only those that differ from the
        last one on their PID: one search of the bytes finds the headers of their packets (and, rarely,
        payload bytes that look like one, which are skipped)."""
        while (found := (self._sections_pattern or self._watch_sections()).search(data, at, end)) is not None:
            offset = found.start()
            if (offset - at) % PACKET_SIZE:
                at = offset + 1  # not where a packet starts
                continue
            self._look_at(data, start, offset)
            at = offset + PACKET_SIZE

    def _watch_sections(self) -> re.Pattern[bytes]:
        """What :meth:`_sections_in` looks for (compiled again whenever the PMT PIDs or the last
        section seen on one of them change)."""
        entries = [_section_start(pid, self._sections.get(pid)) for pid in (0, *self._pmt_pids)]
        self._sections_pattern = re.compile(b"|".join(entries))
        return self._sections_pattern

    def _head_in(self, data: bytes, start: int, at: int, end: int) -> None:
        """In a segment's head: the packets of the streams the PMT lists count as well, found in a
        layout of the packets' PID bytes (:func:`_headers`, :meth:`_watch`)."""
        headers = _headers(data[at + 1 : end : PACKET_SIZE], data[at + 2 : end : PACKET_SIZE])
        index = 0
        while (found := (self._watched or self._watch()).search(headers, 3 * index)) is not None:
            index = found.start() // 3
            self._look_at(data, start, at + index * PACKET_SIZE)
            index += 1
            if self._head_of is None:  # the head is over
                self._sections_in(data, start, at + index * PACKET_SIZE, end)
                return

    def _look_at(self, data: bytes, start: int, offset: int) -> None:
        """The packet at ``offset`` of ``data`` (which starts at byte ``start`` of the stream)."""
        high = data[offset + 1]
        pid = (high & 0x1F) << 8 | data[offset + 2]
        if self._head_of is not None and pid in self._latest:
            self._head_of, self._watched = None, None
        if high & 0x40 and (pid == 0 or pid in self._pmt_pids):
            known = self._sections.get(pid)
            if known is None or not data.startswith(known, offset + 4):
                packet = data[offset : offset + PACKET_SIZE]
                self._sections[pid], self._sections_pattern = packet[4:], None
                self._section(packet, pid, start + offset)

    def _watch(self) -> re.Pattern[bytes]:
        """What :meth:`_head_in` looks for: sections of PID 0 and the PMT PIDs, and the packets of the
        streams the PMT lists (compiled again whenever one of those changes)."""
        entries = [_pid_entry(pid, starts=True) for pid in (0, *self._pmt_pids)]
        entries += [_pid_entry(pid, starts=False) for pid in self._latest]
        self._watched = re.compile(b"|".join(entries))
        return self._watched

    def boundary(self, offset: int) -> None:
        """A segment ended at byte ``offset``: the next one starts on a packet boundary."""
        self._carry = b""
        self._head_of, self._watched = offset, None

    def latest(self, pid: int) -> str | None:
        """The codec the last PMT scanned names for ``pid``."""
        return self._latest.get(pid)

    def codec_at(self, offset: int, pid: int) -> str | None:
        """The codec named for ``pid`` by the last PMT before byte ``offset`` (offsets must not go back)."""
        while self._changes and self._changes[0][0] <= offset:
            _, changed, codec = self._changes.pop(0)
            self._current[changed] = codec
        return self._current.get(pid)

    def _section(self, packet: bytes, pid: int, offset: int) -> None:
        """A packet of PID 0 or a PMT PID where a section starts."""
        control = (packet[3] >> 4) & 0x3
        if not control & 0x1:
            return
        at = 4 + (1 + packet[4] if control & 0x2 else 0)
        if at >= PACKET_SIZE:
            return
        at += 1 + packet[at]  # pointer_field
        if at + 12 > PACKET_SIZE:
            return
        end = at + 3 + (((packet[at + 1] & 0x0F) << 8) | packet[at + 2])
        if end > PACKET_SIZE or _crc32_mpeg2(packet[at:end]) != 0:
            return
        end -= 4  # the CRC
        if pid == 0 and packet[at] == 0x00:  # PAT: program_number, program_map_PID
            for entry in range(at + 8, end - 3, 4):
                if packet[entry] << 8 | packet[entry + 1]:
                    self._pmt_pids.add((packet[entry + 2] & 0x1F) << 8 | packet[entry + 3])
                    self._watched = self._sections_pattern = None
        elif packet[at] == 0x02:  # PMT: stream_type, elementary_PID, ES_info_length, descriptors
            entry = at + 12 + (((packet[at + 10] & 0x0F) << 8) | packet[at + 11])
            while entry + 5 <= end:
                stream = (packet[entry + 1] & 0x1F) << 8 | packet[entry + 2]
                codec = STREAM_TYPES.get(packet[entry])
                if codec is not None and self._latest.get(stream) != codec:
                    self._latest[stream] = codec
                    self._watched = None
                    self._changes.append((offset if self._head_of is None else self._head_of, stream, codec))
                entry += 5 + (((packet[entry + 3] & 0x0F) << 8) | packet[entry + 4])

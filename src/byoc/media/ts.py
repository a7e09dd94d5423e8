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
"""

from __future__ import annotations

__all__ = [
    "FLUSH_ACCESS_UNIT",
    "PACKET_SIZE",
    "SYNC_BYTE",
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

# A complete PES (stream id 0xE0, PES_packet_length 9, no PTS) with one H.264 AUD NAL.
_AUD_PES = b"\x00\x00\x01\xe0\x00\x09\x80\x00\x00" + FLUSH_ACCESS_UNIT


def video_flush_packets(pid: int) -> bytes:
    """Two TS packets on ``pid``, each carrying only an access unit delimiter (see the module docstring)."""
    if not 0 <= pid < 0x1FFF:
        raise ValueError(f"invalid PID {pid}")
    stuffing = PACKET_SIZE - 4 - 1 - len(_AUD_PES)  # header, adaptation_field_length, PES
    # adaptation field: flags (discontinuity_indicator), then stuffing bytes
    adaptation = bytes([stuffing, 0x80]) + b"\xff" * (stuffing - 1)
    # sync, payload_unit_start + PID, adaptation field + payload, continuity counter 0
    header = bytes([SYNC_BYTE, 0x40 | (pid >> 8), pid & 0xFF, 0x30])
    packet = header + adaptation + _AUD_PES
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

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

__all__ = ["FLUSH_ACCESS_UNIT", "PACKET_SIZE", "SYNC_BYTE", "first_video_pts", "video_flush_packets"]

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

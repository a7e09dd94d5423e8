"""The JSON channels of a stream: control (read), events (write) and data (write, JSONL).

* control: one JSON document per segment, read to its end before parsing; ``{"keep":"alive"}`` is the
  gateway's keep-alive and is skipped; every other object is a parameter update.
* events: one wrapped document per segment, ``{"event": {...}, "queue_event_type": "..."}``.
* data: JSON Lines; go-livepeer's line scanner cannot read a line of 64 KiB or more, so such a line is
  refused before anything is sent.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from byoc.errors import DataLineTooLong
from byoc.trickle.protocol import MAX_DATA_LINE_BYTES
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber

__all__ = [
    "DEFAULT_QUEUE_EVENT_TYPE",
    "KEEPALIVE",
    "STATUS_QUEUE_EVENT_TYPE",
    "ControlReader",
    "DataWriter",
    "EventsWriter",
    "encode_data_lines",
]

log = logging.getLogger(__name__)

KEEPALIVE: Mapping[str, str] = {"keep": "alive"}
DEFAULT_QUEUE_EVENT_TYPE = "ai_stream_events"
STATUS_QUEUE_EVENT_TYPE = "ai_stream_status"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class ControlReader:
    """Parameter updates from a control channel, as dicts."""

    def __init__(self, subscriber: TrickleSubscriber) -> None:
        self._subscriber = subscriber
        self.keepalives = 0
        self.invalid = 0

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[dict[str, Any]]:
        async for segment in self._subscriber:
            raw = await segment.read()
            if not raw.strip():
                continue
            try:
                message = json.loads(raw)
            except ValueError as exc:
                self.invalid += 1
                log.warning("control message is not JSON (%d bytes): %s", len(raw), exc)
                continue
            if not isinstance(message, dict):
                self.invalid += 1
                log.warning("control message is not a JSON object: %.80r", message)
                continue
            if message == KEEPALIVE:
                self.keepalives += 1
                continue
            yield message


class EventsWriter:
    """Publishes events, one wrapped JSON document per segment."""

    def __init__(self, publisher: TricklePublisher, *, clock_ms: Callable[[], int] = _now_ms) -> None:
        self._publisher = publisher
        self._clock_ms = clock_ms
        self.sent = 0

    async def send(self, event: Mapping[str, Any], *, queue_event_type: str | None = None) -> None:
        """Send one event; a ``timestamp`` in ms is added when missing."""
        body = dict(event)
        body.setdefault("timestamp", self._clock_ms())
        if queue_event_type is None:
            status = body.get("type") == "status"
            queue_event_type = STATUS_QUEUE_EVENT_TYPE if status else DEFAULT_QUEUE_EVENT_TYPE
        await self._publisher.write_segment(_dumps({"event": body, "queue_event_type": queue_event_type}))
        self.sent += 1

    async def close(self) -> None:
        await self._publisher.close()


def encode_data_lines(messages: list[Any]) -> bytes:
    """JSON Lines for ``messages``; raises DataLineTooLong for a line of 64 KiB or more."""
    lines = []
    for message in messages:
        line = _dumps(message)
        if len(line) + 1 >= MAX_DATA_LINE_BYTES:
            raise DataLineTooLong(
                f"data message is {len(line)} bytes as one JSON line; go-livepeer reads lines only "
                f"below {MAX_DATA_LINE_BYTES} bytes: split it or send less"
            )
        lines.append(line)
    return b"".join(line + b"\n" for line in lines)


class DataWriter:
    """Publishes JSON Lines on a data channel, one segment per batch of messages."""

    def __init__(self, publisher: TricklePublisher) -> None:
        self._publisher = publisher
        self.sent = 0

    async def write(self, *messages: Any) -> None:
        """Send the messages as one segment, one line each. Nothing is sent if any line is too long."""
        if messages:
            await self.write_lines(encode_data_lines(list(messages)))

    async def write_lines(self, lines: bytes) -> None:
        """Send already encoded JSON Lines (see :func:`encode_data_lines`) as one segment."""
        await self._publisher.write_segment(lines)
        self.sent += lines.count(b"\n")

    async def close(self) -> None:
        await self._publisher.close()

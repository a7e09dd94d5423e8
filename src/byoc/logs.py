"""Log set-up for the byoc commands: one line per record, with the stream a record belongs to.

The stream id travels in a context variable. A session sets it on its task; its stage threads are
started with a copy of that context (``byoc.threads.start_thread``), so their lines name it too.
"""

from __future__ import annotations

import contextvars
import logging
import sys

__all__ = ["LOG_FORMAT", "StreamIdFilter", "configure_logging", "current_stream_id"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(stream_id)s] %(message)s"

current_stream_id: contextvars.ContextVar[str] = contextvars.ContextVar("stream_id", default="-")


class StreamIdFilter(logging.Filter):
    """Adds the stream id of the current task or thread (``-`` outside sessions)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "stream_id"):
            record.stream_id = current_stream_id.get()
        return True


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(StreamIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

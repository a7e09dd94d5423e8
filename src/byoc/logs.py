"""Log set-up for the byoc commands: one line per record, with the stream a record belongs to."""

from __future__ import annotations

import logging
import sys

from byoc.session import current_stream_id

__all__ = ["configure_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(stream_id)s] %(message)s"


class _StreamIdFilter(logging.Filter):
    """Adds the stream id of the current task (a contextvar; ``-`` outside sessions)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "stream_id"):
            record.stream_id = current_stream_id.get()
        return True


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_StreamIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

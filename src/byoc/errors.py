"""The byoc exception tree.

Every error byoc raises on purpose derives from :class:`ByocError`::

    ByocError
    ├── ConfigError                  bad settings or a processor reference that cannot be loaded
    │   └── ProcessorLoadError       "package.module:attr" failed to import or resolve
    ├── InvalidRequest               a request to the container is malformed (HTTP 400); ``field`` names what
    ├── TrickleError                 the trickle protocol went wrong for one channel
    │   ├── ChannelGone              404: the channel does not exist (never did, deleted, swept)
    │   ├── ChannelClosed            a publisher found the channel closed (Lp-Trickle-Closed)
    │   ├── RetriesExhausted         transport errors / 5xx beyond the retry budget
    │   └── DataLineTooLong          a JSONL line of 64 KiB or more (go-livepeer cannot read it)
    ├── MediaError                   decoding or encoding failed beyond recovery
    ├── ProcessorError               the model author's code raised
    │   └── ProcessorLost            the worker process running it died (isolation process)
    └── SessionError                 a request about sessions cannot be honoured
        ├── SessionExists            a start for an id that is already running (HTTP 409)
        ├── SessionNotFound          params for an unknown id (HTTP 404)
        └── AdmissionRefused         capacity, memory budget, loading or draining (HTTP 503)
"""

from __future__ import annotations

__all__ = [
    "AdmissionRefused",
    "ByocError",
    "ChannelClosed",
    "ChannelGone",
    "ConfigError",
    "DataLineTooLong",
    "InvalidRequest",
    "MediaError",
    "ProcessorError",
    "ProcessorLoadError",
    "ProcessorLost",
    "RetriesExhausted",
    "SessionError",
    "SessionExists",
    "SessionNotFound",
    "TrickleError",
    "error_kind",
]


class ByocError(Exception):
    """Base class of every error byoc raises on purpose."""


class ConfigError(ByocError):
    """A setting or a processor reference is invalid."""


class ProcessorLoadError(ConfigError):
    """A ``package.module:attr`` reference could not be imported or resolved."""


class InvalidRequest(ByocError):
    """A request body or header is malformed; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TrickleError(ByocError):
    """A trickle channel failed; ``url`` names the channel or segment."""

    def __init__(self, message: str, *, url: str = "") -> None:
        super().__init__(f"{message} ({url})" if url else message)
        self.url = url


class ChannelGone(TrickleError):
    """The server answered 404: the channel does not exist any more."""


class ChannelClosed(TrickleError):
    """A publisher found the channel closed (``Lp-Trickle-Closed``)."""


class RetriesExhausted(TrickleError):
    """Transport errors or 5xx answers exceeded the retry budget."""


class DataLineTooLong(TrickleError):
    """A JSONL line reached 64 KiB, which go-livepeer's line scanner cannot read."""


class MediaError(ByocError):
    """Decoding or encoding failed in a way the session cannot recover from."""


class ProcessorError(ByocError):
    """The processor raised while handling a frame or a session hook."""


class ProcessorLost(ProcessorError):
    """The worker process that ran the processor for a session died (``--isolation process``): the
    session cannot go on, whatever its own hooks did."""


class SessionError(ByocError):
    """A request about a session cannot be honoured."""


class SessionExists(SessionError):
    """A start arrived for a stream id that is already running."""


class SessionNotFound(SessionError):
    """No running session has that stream id."""


class AdmissionRefused(SessionError):
    """A new session cannot be admitted now; ``reason`` says why."""

    def __init__(self, reason: str, *, retry_after_s: int = 5) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


_OOM_NAMES = ("MemoryError", "OutOfMemoryError")


def error_kind(exc: BaseException) -> str:
    """``oom`` for GPU (or host) out-of-memory failures, ``process`` for anything else a processor raised."""
    # by name too: a failure in a worker process arrives as a class named after the original
    if isinstance(exc, MemoryError) or type(exc).__name__ in _OOM_NAMES or "out of memory" in str(exc):
        return "oom"
    return "process"

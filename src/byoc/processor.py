"""The processor contract: the one way a model author plugs into byoc.

One processor object is loaded once per container and shared by every concurrent session::

    class MyModel(Processor):
        def setup(self) -> None:                       # once, before the container is ready
            self.model = load_weights()

        def on_start(self, session: SessionContext) -> None:
            session.state["strength"] = float(session.params.get("strength", 0.5))

        def on_params(self, session: SessionContext, params: Mapping[str, Any]) -> None:
            session.state["strength"] = float(params.get("strength", session.state["strength"]))

        def process(self, frame: Frame, session: SessionContext) -> np.ndarray | None:
            return self.model(frame.rgb, session.state["strength"])   # H x W x 3 uint8 RGB

Every hook may be a plain method or ``async def``. byoc never runs them on the event loop that serves
HTTP: plain methods run on the session's worker thread, coroutines on that thread's own event loop.
Parameter updates are applied between frames. ``process`` may return a new RGB array, the frame itself
(or another :class:`Frame` / ``av.VideoFrame``), or None to drop the frame. Audio passes through
unless ``process_audio`` is overridden.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from byoc.errors import ProcessorLoadError

if TYPE_CHECKING:
    import av

__all__ = [
    "BUILTIN_PROCESSORS",
    "EventSink",
    "Frame",
    "Processor",
    "SessionContext",
    "checked_result",
    "is_async_hook",
    "load_processor",
]


class Frame:
    """A decoded video frame with its timestamp.

    ``rgb`` is the picture as an H x W x 3 uint8 numpy array, converted on first use only, so a
    processor that never looks at the pixels costs no conversion. ``av_frame`` is the underlying
    ``av.VideoFrame`` for authors who want it.
    """

    __slots__ = ("_rgb", "av_frame", "index")

    def __init__(self, av_frame: av.VideoFrame, index: int = 0) -> None:
        self.av_frame = av_frame
        self.index = index
        self._rgb: np.ndarray | None = None

    @property
    def pts(self) -> int:
        return int(self.av_frame.pts or 0)

    @property
    def time_base(self) -> Fraction:
        return Fraction(self.av_frame.time_base or Fraction(1, 90000))

    @property
    def timestamp(self) -> float:
        """Presentation time in seconds."""
        return float(self.pts * self.time_base)

    @property
    def width(self) -> int:
        return int(self.av_frame.width)

    @property
    def height(self) -> int:
        return int(self.av_frame.height)

    @property
    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            rgb_frame = _reformatter().reformat(self.av_frame, format="rgb24", threads=1)
            self._rgb = rgb_frame.to_ndarray()
        return self._rgb


_local = threading.local()


def _reformatter() -> Any:
    """One pixel-format converter per thread: reusing its scaler context makes conversion ~4x cheaper."""
    reformatter = getattr(_local, "reformatter", None)
    if reformatter is None:
        from av.video.reformatter import VideoReformatter

        reformatter = _local.reformatter = VideoReformatter()
    return reformatter


class EventSink(Protocol):
    """Where a session context sends what the processor emits (thread-safe)."""

    def send_data(self, message: Any) -> None: ...

    def send_event(self, event: Mapping[str, Any]) -> None: ...


@dataclass
class SessionContext:
    """What a processor knows about one session.

    ``state`` is the processor's own per-session storage. ``params`` holds the start parameters with
    every update applied. ``send_data`` publishes a JSON-serialisable message on the data channel (when
    the stream has one) and ``send_event`` a custom event on the events channel; both are safe to call
    from any hook.
    """

    stream_id: str
    width: int
    height: int
    params: dict[str, Any]
    sink: EventSink
    state: dict[str, Any] = field(default_factory=dict)

    def send_data(self, message: Any) -> None:
        self.sink.send_data(message)

    def send_event(self, event: Mapping[str, Any]) -> None:
        self.sink.send_event(event)


class Processor:
    """Base class of processors. Override what you need; every hook may be ``async def``."""

    def setup(self) -> Awaitable[None] | None:
        """Load weights and warm up, once. The container is not ready until this returns."""
        return None

    def on_start(self, session: SessionContext) -> Awaitable[None] | None:
        """A session starts; ``session.params`` holds its start parameters."""
        return None

    def on_params(self, session: SessionContext, params: Mapping[str, Any]) -> Awaitable[None] | None:
        """New parameters arrived (already merged into ``session.params``); applied between frames."""
        return None

    def process(self, frame: Frame, session: SessionContext) -> Any:
        """Turn one frame into the frame to publish; return None to drop it."""
        return frame

    def process_audio(self, frame: av.AudioFrame, session: SessionContext) -> Any:
        """Turn one audio frame into the audio to publish (default: unchanged); None drops it."""
        return frame

    def on_stop(self, session: SessionContext) -> Awaitable[None] | None:
        """The session ends; release what ``on_start`` took."""
        return None

    def teardown(self) -> Awaitable[None] | None:
        """The container shuts down."""
        return None


def checked_result(result: Any) -> Any:
    """What ``process`` returned, if it is something it may return: a :class:`Frame`, an
    ``av.VideoFrame``, an H x W x 3 uint8 RGB array, or None; TypeError saying what came instead."""
    import av  # the contract's own import stays light

    if result is None or isinstance(result, (Frame, av.VideoFrame)):
        return result
    if not isinstance(result, np.ndarray):
        raise TypeError(
            f"process() returned {type(result).__name__}; expected a Frame, an av.VideoFrame, "
            "an H x W x 3 uint8 array or None"
        )
    if result.dtype != np.uint8 or result.ndim != 3 or result.shape[2] != 3:
        raise TypeError(
            f"process() returned an array of shape {result.shape} and dtype {result.dtype}; "
            "expected H x W x 3 uint8 RGB"
        )
    return result


def is_async_hook(hook: Callable[..., Any]) -> bool:
    """True when a hook is a coroutine function (it must then run on a processing event loop)."""
    return inspect.iscoroutinefunction(hook)


BUILTIN_PROCESSORS: Mapping[str, str] = {
    "passthrough": "byoc.builtin.passthrough:PassthroughProcessor",
    "invert": "byoc.builtin.invert:InvertProcessor",
    "load": "byoc.builtin.load:create",
}


def load_processor(reference: str, options: Mapping[str, str] | None = None) -> Processor:
    """Load a processor from a built-in name or ``"package.module:attr"``.

    ``attr`` may be a Processor subclass or factory (called with ``options`` as keyword arguments) or a
    ready instance (then ``options`` must be empty). Failures raise ProcessorLoadError saying exactly
    what failed.
    """
    options = dict(options or {})
    target = BUILTIN_PROCESSORS.get(reference, reference)
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        known = ", ".join(sorted(BUILTIN_PROCESSORS))
        raise ProcessorLoadError(
            f"processor reference {reference!r} is neither a built-in ({known}) nor 'package.module:attr'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProcessorLoadError(
            f"cannot import module {module_name!r} for processor {reference!r}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ProcessorLoadError(
                f"module {module_name!r} has no attribute {attr_path!r} (processor {reference!r})"
            ) from None
    if isinstance(obj, Processor):
        if options:
            raise ProcessorLoadError(
                f"{reference!r} is an instance; it takes no options (got {sorted(options)})"
            )
        return obj
    if not callable(obj):
        raise ProcessorLoadError(f"{reference!r} is {type(obj).__name__}, not a Processor class or factory")
    try:
        instance = obj(**options)
    except TypeError as exc:
        raise ProcessorLoadError(
            f"cannot create processor {reference!r} with options {options}: {exc}"
        ) from exc
    if not isinstance(instance, Processor):
        raise ProcessorLoadError(f"{reference!r} returned {type(instance).__name__}, not a byoc Processor")
    return instance

"""One live stream as one unit: it owns its channels, threads and tasks and always ends cleanly.

::

    input (trickle) --> decoder thread --> processing thread --> encoder thread --> output (trickle)
    control (trickle) --> parameter updates            events / data (trickle) <-- status, processor

:meth:`Session.run` drives everything and returns why the session ended: a stop request, the end of
(or 404 on) the input or control channel, a 404 on a channel it publishes, a fatal processor or media
error, its deadline, no input segment for ``input_timeout_s``, or no decoded video frame within
``first_frame_timeout_s`` of its start. A graceful end lets the pipeline drain — the encoder is flushed
and its last segment published — within ``drain_timeout_s``; then a final event goes out and every
channel the session publishes is DELETEd, so the gateway sees the end at once.

A session is ``starting`` until :meth:`Session.run` has started its tasks, then ``running``, then
``ended`` (:class:`SessionState`).

A processor hook that does not return within ``process_timeout_s`` ends the session as
``processor_hung`` (:meth:`Session.abandon_processor`): a Python thread cannot be killed, so the
session stops waiting for its processing thread, ends at once and never joins that thread again; the
runtime counts it among the threads left behind.

Trickle failures follow one policy, whichever of the five channels they happen on: it is written down
in :mod:`byoc.session.policy`, and every channel task hands its errors to ``Session._trickle_failed``.

What the trickle clients recovered from on their own — retried requests, segment bodies restarted
after a break, published segments that broke off — is no error; the statistics report it under
``trickle`` (:class:`~byoc.session.stats.TrickleCounts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import json
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, Protocol

import aiohttp

from byoc.errors import (
    ChannelClosed,
    ChannelGone,
    InvalidRequest,
    ProcessorError,
    TrickleError,
)
from byoc.logs import current_stream_id
from byoc.media.decoder import DecodedOutput, Decoder
from byoc.media.encoder import EncodeInPlace, Encoder
from byoc.media.items import Item, ParamsItem, VideoItem, due_of
from byoc.media.queues import DROP_REASONS, Closed, StageQueue
from byoc.media.stage import Stage
from byoc.params import check_params_size, check_update
from byoc.params import max_fps as parse_max_fps
from byoc.processor import Processor, SessionContext
from byoc.session.events import final_event, params_digest, status_event
from byoc.session.input import InputReader
from byoc.session.output import OutputPump
from byoc.session.policy import FailureBudget, trickle_failure
from byoc.session.stats import (
    AudioCounts,
    LatencyWindow,
    OutputLosses,
    RateMeter,
    SessionStatistics,
    TrickleCounts,
)
from byoc.session.worker import ProcessingWorker, does_nothing
from byoc.spec import EndReason, SessionSettings, StreamSpec
from byoc.threads import call_in_loop
from byoc.trickle.blocking import BlockingPublisher, BlockingSubscriber
from byoc.trickle.channels import ControlReader, DataWriter, EventsWriter, encode_data_lines
from byoc.trickle.layout import Role
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber

__all__ = ["Session", "SessionObserver", "SessionState"]

_EVENT_ONCE = frozenset({"audio_decode", "audio_encode", "output"})
"""Error kinds that also send one ``error`` event, the first time: the audio is dropped, the video
and the session go on (the errors counts say how often)."""

log = logging.getLogger(__name__)

_CLOSE_GRACE_S = 0.2
"""Between a session's last write and the DELETE of its channels: time for readers to fetch it."""
_CLEANUP_S = 1.0
"""Of the drain timeout, what the end keeps for the final event and the DELETEs (a quarter of it when
that is less); they get at least this long even when the drain used up its time."""


class SessionState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"


class SessionObserver(Protocol):
    """Runtime-wide accounting fed by every session (metrics). Called from any thread."""

    def frame_done(self, latency_s: float) -> None: ...

    def processed(self, seconds: float) -> None: ...

    def error(self, kind: str) -> None: ...


class _NoObserver:
    def frame_done(self, latency_s: float) -> None:
        pass

    def processed(self, seconds: float) -> None:
        pass

    def error(self, kind: str) -> None:
        pass


_P = ParamSpec("_P")


def _weakly(method: Callable[_P, object]) -> Callable[_P, None]:
    """A session's bound ``method`` that does not keep the session alive (a no-op once it is gone).

    The stages and the context hold the session's callbacks while the session holds them: strong
    references back would make cycles that free an ended session — with its stages' codec contexts,
    frames and threads — only when the cyclic garbage collector happens to run.
    """
    target = weakref.WeakMethod(method)

    def call(*args: _P.args, **kwargs: _P.kwargs) -> None:
        bound = target()
        if bound is not None:
            bound(*args, **kwargs)

    return call


def _frame_done(latency: LatencyWindow, rate: RateMeter, observer: SessionObserver, item: VideoItem) -> None:
    """A frame was encoded (on the encoder's thread): its latency, the output rate, the runtime's metrics."""
    seconds = time.monotonic() - item.decoded_at
    latency.add(seconds * 1000.0)
    rate.tick()
    observer.frame_done(seconds)


def _forget_cancellation(task: asyncio.Task[Any]) -> None:
    """Drop the CancelledError a cancelled task keeps until someone asks for its result.

    Its traceback holds the frames the cancellation went through, and so the session; when one of those
    frames holds something that refers to the task (an ``asyncio.timeout``), that is a cycle.
    """
    if task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            task.exception()  # hands the kept error over (and forgets it), raising it here


class _WeakSink:
    """The session as its context's EventSink, held weakly (see :func:`_weakly`)."""

    def __init__(self, session: Session) -> None:
        self._send_data = _weakly(session.send_data)
        self._send_event = _weakly(session.send_event)

    def send_data(self, message: Any) -> None:
        self._send_data(message)

    def send_event(self, event: Mapping[str, Any]) -> None:
        self._send_event(event)


class Session:
    """One stream. Create it, ``await run()``, and call ``stop()`` / ``update_params()`` meanwhile."""

    def __init__(
        self,
        spec: StreamSpec,
        processor: Processor,
        http: aiohttp.ClientSession,
        settings: SessionSettings | None = None,
        observer: SessionObserver | None = None,
    ) -> None:
        self.spec = spec
        self.settings = s = settings or SessionSettings()
        self._http = http
        self._observer = observer or _NoObserver()
        self._loop = asyncio.get_running_loop()
        self._reason: EndReason | None = None
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()
        self._worker_done = asyncio.Event()
        self._worker_abandoned = False
        self._said_last: asyncio.Future[None] = self._loop.create_future()  # see final_event_out()
        self._events: asyncio.Queue[tuple[dict[str, Any], str | None]] = asyncio.Queue()
        self._data: asyncio.Queue[bytes] = asyncio.Queue()
        self._state = SessionState.STARTING
        self._started_at = time.time()
        self._started_mono = time.monotonic()
        self._input_arrived = asyncio.Event()  # an input segment started arriving (see _watch_input)
        self._errors: dict[str, int] = {}
        self._errors_lock = threading.Lock()  # the stage threads and the loop all count errors
        self._last_error: str | None = None
        self._input_rate, self._output_rate = RateMeter(), RateMeter()
        self._latency = LatencyWindow()
        self._subscribers: list[TrickleSubscriber | BlockingSubscriber] = []
        self._publishers: list[TricklePublisher | BlockingPublisher] = []
        self._output_done = asyncio.Event()  # the encoder finished: its output is published or lost
        self._end_by: float | None = None  # stop() + drain_timeout_s: when the session must have ended
        sink = _WeakSink(self)
        self.context = SessionContext(spec.stream_id, spec.width, spec.height, dict(spec.params), sink)
        self._params = dict(spec.params)
        self._frames: StageQueue[Item] = StageQueue(
            capacity=s.queue_capacity, budget_s=s.latency_budget_s, due_of=due_of
        )
        self._processed: StageQueue[Item] = StageQueue(
            capacity=s.queue_capacity, budget_s=s.latency_budget_s, due_of=due_of
        )
        has_input = spec.subscribe_url is not None
        has_output = has_input and spec.publish_url is not None
        self._no_processing = has_output and does_nothing(processor)
        self._media_out: BlockingPublisher | None = None
        self._output: OutputPump | None = None
        self._encoder: Encoder | None = None
        if has_output:
            assert spec.publish_url is not None
            self._media_out = BlockingPublisher(spec.publish_url, mime_type="video/mp2t", settings=s.trickle)
            self._publishers.append(self._media_out)
            self._output = OutputPump(
                spec.stream_id,
                self._media_out,
                FailureBudget(s.output_failure_budget_s, EndReason.OUTPUT_UNREACHABLE),
                on_error=_weakly(self._error),
                on_gone=self._from_thread(_weakly(self._output_gone)),
                on_given_up=self._from_thread(_weakly(self._output_given_up)),
                on_first_segment=self._from_thread(_weakly(self._first_output_segment)),
                on_finished=self._from_thread(self._output_done.set),
            )
            self._encoder = Encoder(
                self._processed,
                self._output,
                dataclasses.replace(s.encoder, width=spec.width, height=spec.height),
                name=f"encode-{spec.stream_id}",
                nice=s.thread_nice,
                # What it holds does not hold the session: no weak reference to pass through a frame.
                on_frame=functools.partial(_frame_done, self._latency, self._output_rate, self._observer),
                on_error=_weakly(self._error),
            )

        # A processor that does nothing gets no processing stage: the decoder's thread encodes too.
        decoded: DecodedOutput = self._frames
        if self._encoder is not None and self._no_processing:
            decoded = EncodeInPlace(self._encoder)
        self._decoder: Decoder | None = None
        self._input: InputReader | None = None
        if has_input:
            self._decoder = Decoder(
                decoded,
                width=spec.width,
                height=spec.height,
                max_fps=spec.max_fps,
                name=f"decode-{spec.stream_id}",
                nice=s.thread_nice,
                codec=s.encoder.codec,
                on_error=_weakly(self._error),
                on_frame=self._input_rate.tick,
                max_buffered_bytes=s.input_buffer_bytes,
                latency_budget_s=s.latency_budget_s,
            )
            assert spec.subscribe_url is not None
            subscriber = BlockingSubscriber(spec.subscribe_url, settings=s.trickle)
            self._subscribers.append(subscriber)
            self._input = InputReader(
                subscriber,
                self._decoder,
                name=f"input-{spec.stream_id}",
                nice=s.thread_nice,
                on_segment=self._from_thread(_weakly(self._input_segment)),
                on_end=self._from_thread(_weakly(self._input_ended)),
            )
        self._worker = ProcessingWorker(
            processor,
            self.context,
            self._frames,
            self._processed if has_output else None,
            max_consecutive_errors=s.max_consecutive_errors,
            name=f"process-{spec.stream_id}",
            nice=s.thread_nice,
            on_error=_weakly(self._error),
            on_started=self._from_thread(self._started.set),
            on_exit=self._from_thread(self._worker_done.set),
            on_processed=self._observer.processed,
        )

    def _from_thread(self, callback: Callable[_P, object]) -> Callable[_P, None]:
        """``callback`` made safe to call from another thread: it runs on the session's loop."""

        loop = self._loop  # not self: the stages would hold the session (see _weakly)

        def schedule(*args: _P.args, **kwargs: _P.kwargs) -> None:
            call_in_loop(loop, functools.partial(callback, *args, **kwargs))

        return schedule

    # --- control from the runtime (event loop) --------------------------------------------------

    @property
    def stream_id(self) -> str:
        return self.spec.stream_id

    @property
    def end_reason(self) -> EndReason | None:
        return self._reason

    @property
    def stopping(self) -> bool:
        """True once the session was asked to end (it is draining)."""
        return self._stopping.is_set()

    def stop(self, reason: EndReason = EndReason.STOPPED) -> None:
        """Ask the session to end: the input stops, the pipeline drains, then it cleans up, all within
        ``drain_timeout_s``."""
        if self._reason is None:
            self._reason = reason
            log.info("stream %s: ending (%s)", self.stream_id, reason)
        if self._end_by is None:
            self._end_by = time.monotonic() + self.settings.drain_timeout_s
        self._stopping.set()

    def update_params(self, params: Mapping[str, Any]) -> bool:
        """Apply new parameters between two frames (from /stream/params or the control channel).

        Only on the session's event loop (docs/architecture.md): another thread hands the call over
        with byoc.threads.run_on_loop, or gets a RuntimeError and changes nothing. The update is checked
        by :func:`byoc.params.check_update`, as a ``/stream/params`` request is; a refused update changes
        nothing: it is logged, counted as a ``params`` error and reported with a ``params_rejected``
        event. Returns whether the update was applied.
        """
        if not _on_loop(self._loop):
            raise RuntimeError(
                f"stream {self.stream_id}: update_params called off the session's event loop "
                "(hand it over with byoc.threads.run_on_loop)"
            )
        try:
            update = check_update(params)
            max_fps = parse_max_fps(update["max_fps"]) if "max_fps" in update else None
            check_params_size({**self._params, **update}, self.settings.max_params_bytes)
        except InvalidRequest as exc:
            log.warning("stream %s: parameter update refused: %s", self.stream_id, exc)
            self._error("params", f"parameter update refused: {exc}")
            self.send_event({"type": "params_rejected", "field": exc.field, "error": exc.message})
            return False
        self._params.update(update)  # what the stream was given; the processor sees it between frames
        if "max_fps" in update and self._decoder is not None:
            self._decoder.max_fps = max_fps
        if self._no_processing:
            self.context.params.update(update)  # no thread reads them meanwhile
        else:
            with contextlib.suppress(Closed):
                self._frames.put(ParamsItem(update), droppable=False)
        self.send_event({"type": "params_updated", "params": params_digest(update)})
        return True

    def stuck_stages(self) -> list[str]:
        """The stages whose threads are still running (after the end: the ones left behind, hung)."""
        return list(self.running_stages())

    def running_stages(self) -> dict[str, Stage]:
        """:meth:`stuck_stages` with the stages themselves, to tell later whether they ever finish."""
        stages = (
            ("input", self._input),
            ("decoder", self._decoder),
            ("processor", self._worker),
            ("encoder", self._encoder),
        )
        return {name: stage for name, stage in stages if stage is not None and stage.running}

    def abandon_processor(self, reason: EndReason, message: str) -> None:
        """End now without waiting for the processing thread, which is stuck in a hook: the session
        stops waiting for it and never joins it; the other stages finish with what they have."""
        if self._worker_abandoned:
            return
        self._worker_abandoned = True
        stack = self._worker.stack()
        log.error("stream %s: %s; its thread is abandoned at:\n%s", self.stream_id, message, stack)
        self._error("hung", message)
        self.stop(reason)
        self._close_queues()
        self._worker_done.set()

    def final_event_out(self) -> asyncio.Future[None]:
        """Done once the session's last output segment and its final event are out (published, lost,
        or given up on at the drain deadline; without an events channel: once the output is over).
        Wait on it, never resolve it; a session cancelled before its end never resolves it.

        go-livepeer closes a stream's channels as soon as the container answers its ``/stream/stop``,
        so that answer waits for this (docs/protocol.md §2.5); the DELETEs follow later.
        """
        return self._said_last

    async def wait_started(self) -> None:
        """Return once the processor's ``on_start`` ran; raise ProcessorError if it failed."""
        started = asyncio.ensure_future(self._started.wait())
        done = asyncio.ensure_future(self._worker_done.wait())
        try:
            await asyncio.wait((started, done), return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
            done.cancel()
        if not self._started.is_set():
            error = self._worker.error
            raise ProcessorError(str(error) if error else "the session ended before it started")

    # --- the EventSink of SessionContext (any thread) -------------------------------------------

    def send_data(self, message: Any) -> None:
        line = encode_data_lines([message])  # raises DataLineTooLong in the caller's thread
        call_in_loop(self._loop, self._data.put_nowait, line)

    def send_event(self, event: Mapping[str, Any], queue_event_type: str | None = None) -> None:
        """Queue an event for the events channel. An event that is not JSON raises TypeError here, in
        the caller's thread (a processor's hook fails, as with ``send_data``), never later in the
        session's own task."""
        try:
            json.dumps(event)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"an event must be a JSON object: {exc}") from None
        call_in_loop(self._loop, self._events.put_nowait, (dict(event), queue_event_type))

    # --- statistics -----------------------------------------------------------------------------

    def _error(self, kind: str, message: str | None = None) -> None:
        with self._errors_lock:
            count = self._errors[kind] = self._errors.get(kind, 0) + 1
            if message:
                self._last_error = message
        self._observer.error(kind)
        if count == 1 and kind in _EVENT_ONCE:
            self.send_event({"type": "error", "kind": kind, "error": message or kind})

    def _error_counts(self) -> dict[str, int]:
        with self._errors_lock:
            return dict(self._errors)

    def statistics(self) -> SessionStatistics:
        decoder = self._decoder.statistics() if self._decoder else None
        worker = self._worker.statistics()
        encoder = self._encoder.statistics() if self._encoder else None
        queued = Counter(self._frames.drop_counts()) + Counter(self._processed.drop_counts())
        queued["late"] += decoder.frames_late if decoder else 0
        dropped = {
            **{reason: queued[reason] for reason in DROP_REASONS},
            "processor": worker.frames_dropped_by_processor,
            "rate_cap": decoder.frames_capped if decoder else 0,
            "timestamps": decoder.frames_rejected if decoder else 0,
        }
        return SessionStatistics(
            stream_id=self.stream_id,
            state=self._state,
            started_at_ms=int(self._started_at * 1000),
            uptime_s=time.monotonic() - self._started_mono,
            params=dict(self._params),
            width=self.spec.width,
            height=self.spec.height,
            has_audio=bool(decoder and decoder.has_audio),
            input_segments=decoder.segments_in if decoder else 0,
            input_bytes=decoder.bytes_in if decoder else 0,
            frames_in=decoder.frames_decoded if decoder else 0,
            input_fps=self._input_rate.rate(),
            frames_out=encoder.frames_out if encoder else worker.frames_out,
            output_fps=self._output_rate.rate(),
            output_segments=encoder.segments_out if encoder else 0,
            output_bytes=encoder.bytes_out if encoder else 0,
            dropped=dropped,
            errors=self._error_counts(),
            latency_ms=self._latency.percentiles(),
            last_error=self._last_error or worker.last_error,
            end_reason=str(self._reason) if self._reason and self._state is SessionState.ENDED else None,
            trickle=self._trickle_counts(),
            output_lost=self._output.losses() if self._output is not None else OutputLosses(),
            audio=AudioCounts(
                encoder.audio_frames_in,
                encoder.audio_seconds_in,
                encoder.audio_packets_out,
                encoder.audio_seconds_out,
                encoder.audio_frames_dropped,
            )
            if encoder
            else AudioCounts(),
        )

    def _trickle_counts(self) -> TrickleCounts:
        subscribers = [s.statistics() for s in list(self._subscribers)]
        publishers = [p.statistics() for p in list(self._publishers)]
        return TrickleCounts(
            retries=sum(s.retries for s in subscribers) + sum(p.retries for p in publishers),
            restarts=sum(s.restarts for s in subscribers),
            broken_segments=sum(p.broken_segments for p in publishers),
            skipped_segments=sum(s.skipped for s in subscribers),
        )

    # --- the session ----------------------------------------------------------------------------

    async def run(self) -> EndReason:
        """Run the session to its end and clean up; returns why it ended."""
        current_stream_id.set(self.stream_id)
        events = self._publisher(self.spec.events_url, "application/json")
        data = self._publisher(self.spec.data_url, "application/jsonl")
        try:
            if self._no_processing:
                self._started.set()  # there is no on_start to wait for
            # without a processing stage the decoder's thread encodes: neither of the others runs
            media = (self._decoder,) if self._no_processing else (self._worker, self._decoder, self._encoder)
            for stage in (*media, self._input):
                if stage is not None:
                    stage.start()  # inside the try: a thread that cannot start still gets the cleanup
            async with asyncio.TaskGroup() as tasks:
                name = self.stream_id
                background = [
                    tasks.create_task(
                        self._report(EventsWriter(events) if events else None), name=f"{name}:events"
                    ),
                    tasks.create_task(self._enforce_drain_deadline(), name=f"{name}:drain-deadline"),
                ]
                if self.spec.control_url:
                    control = self._watch_control(self.spec.control_url)
                    background.append(tasks.create_task(control, name=f"{name}:control"))
                if data is not None:
                    background.append(
                        tasks.create_task(self._publish_data(DataWriter(data)), name=f"{name}:data")
                    )
                if self.settings.process_timeout_s:
                    watchdog = self._watch_processor(self.settings.process_timeout_s)
                    background.append(tasks.create_task(watchdog, name=f"{name}:watchdog"))
                if self.settings.max_duration_s:
                    deadline = self._deadline(self.settings.max_duration_s)
                    background.append(tasks.create_task(deadline, name=f"{name}:deadline"))
                if self._decoder is not None and self.settings.input_timeout_s:
                    idle = self._watch_input(self.settings.input_timeout_s)
                    background.append(tasks.create_task(idle, name=f"{name}:input-timeout"))
                if self._decoder is not None and self.settings.first_frame_timeout_s:
                    first = self._first_frame_deadline(self.settings.first_frame_timeout_s)
                    background.append(tasks.create_task(first, name=f"{name}:first-frame"))
                self._state = SessionState.RUNNING
                try:
                    await self._run_pipeline()
                finally:
                    for task in background:
                        task.add_done_callback(_forget_cancellation)
                        task.cancel()
        finally:
            self._state = SessionState.ENDED
            if self._reason is None:
                self._reason = self._reason_from_stages()
            await self._finish(events, self._media_out, data)
        return self._reason

    def _publisher(self, url: str | None, mime: str) -> TricklePublisher | None:
        if url is None:
            return None
        publisher = TricklePublisher(url, session=self._http, mime_type=mime, settings=self.settings.trickle)
        self._publishers.append(publisher)
        return publisher

    def _subscriber(self, url: str) -> TrickleSubscriber:
        subscriber = TrickleSubscriber(url, session=self._http, settings=self.settings.trickle)
        self._subscribers.append(subscriber)
        return subscriber

    def _trickle_failed(self, channel: Role, error: TrickleError | None) -> EndReason | None:
        """Apply the trickle policy (:func:`trickle_failure`): count the error, end the session if it
        must; returns the end reason, None when the session goes on."""
        if error is not None and not isinstance(error, (ChannelGone, ChannelClosed)):
            self._error("trickle", f"{channel} channel: {error}")
        reason = trickle_failure(channel, error)
        if reason is not None:
            self.stop(reason)
        return reason

    async def _run_pipeline(self) -> None:
        """Media until the pipeline has drained (without input: until a stop)."""
        cut = asyncio.create_task(self._cut_input_on_stop(), name=f"{self.stream_id}:stop-input")
        try:
            if self._encoder is not None:
                await self._output_done.wait()
            else:
                await self._worker_done.wait()
        finally:
            cut.add_done_callback(_forget_cancellation)
            cut.cancel()
        if self._reason is None:
            self._reason = self._reason_from_stages()

    async def _cut_input_on_stop(self) -> None:
        await self._stopping.wait()
        if self._decoder is not None:
            self._end_input()  # the pipeline drains
        else:
            self._frames.close()

    async def _enforce_drain_deadline(self) -> None:
        """Past the drain's share of ``drain_timeout_s`` the pipeline stops (what it still holds is not
        sent), so that the final event and the DELETEs fit in the rest."""
        await self._stopping.wait()
        cleanup_s = _cleanup_s(self.settings.drain_timeout_s)
        drain_s = self.settings.drain_timeout_s - cleanup_s
        await asyncio.sleep(max(0.0, self._end_deadline() - cleanup_s - time.monotonic()))
        stuck = self.stuck_stages()
        log.error(
            "stream %s: drain took over %.1fs; still busy: %s",
            self.stream_id,
            drain_s,
            ", ".join(stuck) or "the output",
        )
        self._last_error = f"drain timed out; still busy: {', '.join(stuck) or 'the output'}"
        self._close_queues()
        if self._output is not None:
            self._output.cut()
        if self._worker.running:  # stuck in a hook: the session ends without it
            self._worker_abandoned = True
            self._worker_done.set()

    def _close_queues(self) -> None:
        """Let every stage that still can finish finish now (a hung processor is left behind)."""
        self._end_input()
        self._frames.close()
        self._processed.close()

    def _end_input(self) -> None:
        """No more input is read; the decoder decodes what it has, then finishes."""
        if self._input is not None:
            self._input.close()
        if self._decoder is not None:
            self._decoder.end()

    def _reason_from_stages(self) -> EndReason:
        if self._worker.error is not None:
            return EndReason.PROCESSOR_ERROR
        if any(stage is not None and stage.error is not None for stage in (self._decoder, self._encoder)):
            return EndReason.MEDIA_ERROR
        return EndReason.STOPPED

    def _input_segment(self, index: int) -> None:
        """An input segment started arriving (on the decoder's thread; called here on the loop)."""
        self._input_arrived.set()  # the input timeout counts from here
        if index == 0:
            self.send_event({"type": "receive_first_ingest_segment"}, "stream_trace")

    def _input_ended(self, error: TrickleError | None) -> None:
        self._trickle_failed("input", error)

    def _output_gone(self, error: TrickleError) -> None:
        self._trickle_failed("output", error)  # ends the session
        self._close_queues()

    def _output_given_up(self, reason: EndReason) -> None:
        self.stop(reason)
        self._close_queues()  # the encoder's remaining output is counted, not sent

    def _first_output_segment(self) -> None:
        self.send_event({"type": "send_first_processed_segment"}, "stream_trace")

    async def _watch_control(self, url: str) -> None:
        try:
            async with self._subscriber(url) as subscriber:
                async for params in ControlReader(subscriber):
                    self.update_params(params)
            self._trickle_failed("control", None)
        except TrickleError as exc:
            self._trickle_failed("control", exc)

    async def _watch_processor(self, timeout_s: float) -> None:
        """The watchdog: a hook call (``on_start`` aside, which admission bounds) that runs past
        ``timeout_s`` ends the session as ``processor_hung``."""
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            busy = self._worker.busy()
            if busy is not None and busy[0] != "on_start" and busy[1] > timeout_s:
                message = f"the processor's {busy[0]}() did not return within {timeout_s:g}s"
                self.abandon_processor(EndReason.PROCESSOR_HUNG, message)
                return

    async def _deadline(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.stop(EndReason.DEADLINE)

    async def _watch_input(self, timeout_s: float) -> None:
        """End the session as ``input_timeout`` once no input segment has started to arrive for
        ``timeout_s`` (counted from the start for the first one). Waiting for the next segment is the
        input's normal state, so only the time since the last one began counts: a gateway that vanished
        without closing its channel would otherwise hold the slot for ever (docs/protocol.md §2.6)."""
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._input_arrived.wait()
            except TimeoutError:
                break
            self._input_arrived.clear()  # the clock starts again from this segment
        self._limit_reached(EndReason.INPUT_TIMEOUT, f"no input segment for {timeout_s:g}s")

    async def _first_frame_deadline(self, timeout_s: float) -> None:
        """End the session as ``first_frame_timeout`` if it has decoded no video frame ``timeout_s``
        after its start: input that arrives but never decodes (docs/protocol.md §2.6)."""
        await asyncio.sleep(timeout_s)
        if self._input_rate.last is None:  # the decoder ticks it for every video frame it decodes
            self._limit_reached(
                EndReason.FIRST_FRAME_TIMEOUT, f"no video frame decoded within {timeout_s:g}s"
            )

    def _limit_reached(self, reason: EndReason, message: str) -> None:
        """End the session because one of its limits ran out (unless it is ending already)."""
        if self.stopping:
            return
        log.warning("stream %s: %s; ending it", self.stream_id, message)
        self._last_error = message
        self.stop(reason)

    async def _report(self, events: EventsWriter | None) -> None:
        """The first event at once, then a status event every ``status_interval_s``, and whatever
        else is queued (lifecycle, parameter updates, the processor's own events) as it comes."""
        interval = self.settings.status_interval_s
        await self._send_event(events, self._status_event())
        next_status = time.monotonic() + interval
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_status - time.monotonic())):
                    event, queue_event_type = await self._events.get()
            except TimeoutError:
                await self._send_event(events, self._status_event())
                next_status = time.monotonic() + interval
                continue
            await self._send_event(events, event, queue_event_type)

    async def _send_event(
        self, events: EventsWriter | None, event: Mapping[str, Any], queue_event_type: str | None = None
    ) -> None:
        if events is None:
            return
        body = {"stream_id": self.stream_id, **event}
        try:
            await events.send(body, queue_event_type=queue_event_type)
        except TrickleError as exc:
            self._trickle_failed("events", exc)

    def _status_event(self) -> dict[str, Any]:
        now = time.monotonic()
        return status_event(
            self.statistics(), _since(now, self._input_rate.last), _since(now, self._output_rate.last)
        )

    async def _publish_data(self, writer: DataWriter) -> None:
        while True:
            lines = [await self._data.get()]
            await asyncio.sleep(self.settings.data_batch_s)  # one segment per batch, not per message
            while not self._data.empty():
                lines.append(self._data.get_nowait())
            try:
                await writer.write_lines(b"".join(lines))
            except TrickleError as exc:
                if self._trickle_failed("data", exc) is not None:
                    return

    def _end_deadline(self) -> float:
        """When the session must have ended: ``drain_timeout_s`` after it was asked to stop (from now,
        for an end nobody asked for)."""
        return self._end_by if self._end_by is not None else time.monotonic() + self.settings.drain_timeout_s

    async def _send_final_event(self, events: TricklePublisher, timeout_s: float) -> None:
        """The ``stream_stopped`` event, within ``timeout_s``; whatever goes wrong is logged, not raised."""
        try:
            async with asyncio.timeout(timeout_s):
                final = final_event(self.statistics(), str(self._reason))
                await self._send_event(EventsWriter(events), final)
        except TimeoutError:
            log.warning("stream %s: the final event got no answer within %.1fs", self.stream_id, timeout_s)
        except Exception:
            log.exception("stream %s: the final event could not be sent", self.stream_id)

    async def _close_channels(
        self, channels: list[TricklePublisher | BlockingPublisher], end_by: float
    ) -> None:
        """DELETE ``channels`` (and end their uploads), giving up at ``end_by``."""
        left = max(0.0, end_by - time.monotonic())
        closes = [
            p.close() if isinstance(p, TricklePublisher) else asyncio.to_thread(p.close, left)
            for p in channels
        ]
        try:
            async with asyncio.timeout(left):
                await asyncio.gather(*closes, return_exceptions=True)
        except TimeoutError:
            log.warning("stream %s: its channels did not answer the DELETEs in time", self.stream_id)

    async def _finish(
        self, events: TricklePublisher | None, *others: TricklePublisher | BlockingPublisher | None
    ) -> None:
        """Final event, then DELETE every channel this session publishes: the DELETEs whatever became of
        the final event (even when the session is cancelled meanwhile), and both by the session's end
        deadline, so that channels that never answer cannot hold the end up."""
        self._close_queues()
        end_by = max(self._end_deadline(), time.monotonic() + _CLEANUP_S)
        open_channels = [p for p in (*others, events) if p is not None]
        try:
            if events is not None:
                await self._send_final_event(events, (end_by - time.monotonic()) / 2)
            if not self._said_last.done():
                self._said_last.set_result(None)  # the answer to a stop may go now
            if open_channels:
                # A DELETE makes the trickle server forget the channel's segments at once: a reader that
                # has not yet asked for the last one (the final event, the last output segment) would
                # get 404.
                await asyncio.sleep(min(_CLOSE_GRACE_S, (end_by - time.monotonic()) / 4))
        finally:
            await self._close_channels(open_channels, end_by)
        worker = None if self._worker_abandoned else self._worker
        # finishing now, unless one hangs in user code: joined in one hop off the loop
        stages = (self._input, self._decoder, worker, self._encoder)
        running = [stage for stage in stages if stage is not None and stage.running]
        if running:
            await asyncio.to_thread(_join, running, 1.0)
        log.info("stream %s: ended (%s)", self.stream_id, self._reason)


def _join(stages: Sequence[Stage], timeout_s: float) -> None:
    """Wait for each stage's thread, at most ``timeout_s`` each."""
    for stage in stages:
        stage.join(timeout_s)


def _cleanup_s(drain_timeout_s: float) -> float:
    """What of ``drain_timeout_s`` is kept for the final event and the DELETEs."""
    return min(_CLEANUP_S, drain_timeout_s / 4)


def _since(now: float, moment: float | None) -> float | None:
    return None if moment is None else now - moment


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the calling thread is running ``loop``."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop runs in this thread
        return False

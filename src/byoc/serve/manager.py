"""The session manager: owns every session, admits new ones, routes requests to them, drains them.

go-livepeer does not check capacity before it sends a start (docs/protocol.md §2.7), so the container
enforces its own limit: a start beyond ``max_sessions`` — or while the processor loads, while the
runtime drains, or when the GPU has no room — is refused with a reason. Admission and registration of
a session happen without an ``await`` in between, so concurrent starts can never overshoot the limit.

Thread ownership (docs/architecture.md): the manager and its sessions are mutated only on the
runtime's main loop, the loop that created them. Every other thread reads snapshots
(:meth:`SessionManager.statistics`, :meth:`SessionManager.totals`, ``len``) and hands commands over:
the HTTP API through byoc.serve.control.RuntimeControl, which runs :meth:`~SessionManager.start`,
:meth:`~SessionManager.resolve`, :meth:`~SessionManager.stop` and ``Session.update_params`` on the
main loop. ``Session.update_params`` refuses to run anywhere else.

A processor that hangs poisons the process: its thread cannot be killed, only left behind. A start
whose ``on_start`` does not return within ``start_timeout_s`` is refused (503) and its session ended
at once; every thread a session leaves behind is counted while it runs
(:meth:`SessionManager.abandoned_threads`), and past ``max_abandoned_threads`` starts are refused and
``/health`` is unready (:meth:`SessionManager.poisoned`), so that the orchestrator sends work elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from collections.abc import Callable

import aiohttp

from byoc.errors import AdmissionRefused, ProcessorError, SessionExists, SessionNotFound
from byoc.media.stage import Stage
from byoc.processor import Processor
from byoc.serve.metrics import FrameTotals
from byoc.serve.system import trim_memory
from byoc.session import Session, SessionObserver
from byoc.session.stats import SessionStatistics
from byoc.spec import EndReason, SessionSettings, StreamSpec

__all__ = ["SessionManager"]

log = logging.getLogger(__name__)


class SessionManager:
    """Sessions by stream id."""

    def __init__(
        self,
        processor: Processor | None,
        http: aiohttp.ClientSession,
        settings: SessionSettings,
        observer: SessionObserver,
        *,
        max_sessions: int,
        gate: Callable[[], str | None] = lambda: None,
        start_timeout_s: float = 10.0,
        max_abandoned_threads: int = 2,
        on_ended: Callable[[], None] = lambda: None,
    ) -> None:
        self.processor = processor
        """Shared by every session; None until it is loaded (starts are refused meanwhile)."""
        self._http = http
        self._settings = settings
        self._observer = observer
        self.max_sessions = max_sessions
        self._gate = gate
        self.start_timeout_s = start_timeout_s
        self.max_abandoned_threads = max_abandoned_threads
        self._on_ended = on_ended
        """Called on the main loop after each session ended and was cleaned up."""
        self._sessions: dict[str, Session] = {}
        self._tasks: dict[str, asyncio.Task[EndReason]] = {}
        self._retired_in = self._retired_out = self._started = 0
        self._retired_dropped: Counter[str] = Counter()
        self._ended: Counter[str] = Counter()
        # (stream id, stage, the stage held weakly: freed with its session once its thread returns);
        # replaced, never mutated, as the API thread reads it
        self._left_behind: list[tuple[str, str, weakref.ref[Stage]]] = []

    # --- queries --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, stream_id: str) -> Session:
        try:
            return self._sessions[stream_id]
        except KeyError:
            raise SessionNotFound(f"no session {stream_id!r}") from None

    def resolve(self, stream_id: str | None) -> Session | None:
        """The session a params/stop request means: by id, or the only one when no id was given."""
        if stream_id:
            return self._sessions.get(stream_id)
        if len(self._sessions) == 1:
            return next(iter(self._sessions.values()))
        return None

    def stuck_stages(self) -> dict[str, list[str]]:
        """Ended sessions whose threads are still running, left behind in a processor hook that never
        returned: the stages by stream id."""
        stuck: dict[str, list[str]] = {}
        for stream_id, name in self._still_running():
            stuck.setdefault(stream_id, []).append(name)
        return stuck

    def abandoned_threads(self) -> int:
        """Threads that ended sessions left behind and that still run (safe from the API thread)."""
        return len(self._still_running())

    def _still_running(self) -> list[tuple[str, str]]:
        return [
            (stream_id, name)
            for stream_id, name, reference in self._left_behind
            if (stage := reference()) is not None and stage.running
        ]

    def poisoned(self) -> str | None:
        """Why this process should get no more work (too many threads stuck in the processor), or None."""
        count = self.abandoned_threads()
        if count > self.max_abandoned_threads:
            return f"{count} threads are stuck in the processor (more than {self.max_abandoned_threads})"
        return None

    def statistics(self) -> list[SessionStatistics]:
        """Every session's snapshot (safe to call from the API thread)."""
        return [session.statistics() for session in list(self._sessions.values())]

    def totals(self) -> FrameTotals:
        """Frames since start-up: ended sessions plus the running ones (monotonic)."""
        frames_in, frames_out, dropped = self._retired_in, self._retired_out, Counter(self._retired_dropped)
        for stats in self.statistics():
            frames_in += stats.frames_in
            frames_out += stats.frames_out
            dropped.update(stats.dropped)
        return FrameTotals(frames_in, frames_out, dict(dropped), self._started, dict(self._ended))

    # --- lifecycle ------------------------------------------------------------------------------

    def admit(self, spec: StreamSpec) -> Session:
        """Create and start a session, or raise SessionExists / AdmissionRefused. Never awaits."""
        if spec.stream_id in self._sessions:
            raise SessionExists(f"stream {spec.stream_id!r} is already running")
        # A session that was asked to stop is on its way out (its pipeline drains in milliseconds): its
        # slot is free, as it is on the orchestrator, so a stop followed at once by a start works.
        running = sum(1 for session in self._sessions.values() if not session.stopping)
        if running >= self.max_sessions:
            raise AdmissionRefused(f"at capacity: {running} of {self.max_sessions} sessions running")
        if reason := self.poisoned() or self._gate():
            raise AdmissionRefused(reason)
        if self.processor is None:
            raise AdmissionRefused("the processor is still loading")
        session = Session(spec, self.processor, self._http, self._settings, self._observer)
        self._sessions[spec.stream_id] = session
        self._started += 1
        task = asyncio.create_task(self._run(session), name=f"{spec.stream_id}:session")
        self._tasks[spec.stream_id] = task
        log.info("stream %s: admitted (%d of %d)", spec.stream_id, len(self._sessions), self.max_sessions)
        return session

    async def start(self, spec: StreamSpec) -> Session:
        """Admit a session and wait until its processor hooks ran ``on_start``; a start that fails or
        does not return within ``start_timeout_s`` leaves nothing behind but, for a hang, the thread."""
        session = self.admit(spec)
        task = self._tasks[spec.stream_id]
        try:
            async with asyncio.timeout(self.start_timeout_s):
                await session.wait_started()
        except TimeoutError:
            message = f"the processor's on_start() did not return within {self.start_timeout_s:g}s"
            session.abandon_processor(EndReason.PROCESSOR_HUNG, message)
            await asyncio.shield(task)
            raise AdmissionRefused(message) from None
        except ProcessorError:
            session.stop(EndReason.PROCESSOR_ERROR)
            await asyncio.shield(task)
            raise
        return session

    def stop(self, stream_id: str, reason: EndReason = EndReason.STOPPED) -> bool:
        """Ask a session to end; False if there is none with that id (stop is idempotent)."""
        session = self._sessions.get(stream_id)
        if session is None:
            return False
        session.stop(reason)
        return True

    async def wait_final_event(self, stream_id: str, timeout: float) -> None:  # noqa: ASYNC109
        """Wait up to ``timeout`` until the session's last output segment and final event are out (or
        it has ended); at once when there is no such session.

        go-livepeer closes a stream's channels as soon as ``/stream/stop`` is answered
        (docs/protocol.md §2.5): answered before this, the gateway would miss the end of the stream.
        """
        session, task = self._sessions.get(stream_id), self._tasks.get(stream_id)
        if session is None or task is None or timeout <= 0:
            return
        done, _ = await asyncio.wait(
            (session.final_event_out(), task), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            log.warning("stream %s: no final event within %.1fs; answering all the same", stream_id, timeout)

    async def drain(self, timeout: float) -> list[str]:  # noqa: ASYNC109
        """End every session (the encoders flush, final events go out); ids still running at the deadline."""
        for session in list(self._sessions.values()):
            session.stop(EndReason.SHUTDOWN)
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return list(self._sessions)

    async def cancel_all(self) -> None:
        """Last resort after a drain deadline: cancel what is left."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, session: Session) -> EndReason:
        reason = EndReason.STOPPED
        try:
            reason = await session.run()
        except Exception:
            log.exception("stream %s: session failed", session.stream_id)
            self._observer.error("other")
        finally:
            stats = session.statistics()
            self._retired_in += stats.frames_in
            self._retired_out += stats.frames_out
            self._retired_dropped.update(stats.dropped)
            self._ended[str(session.end_reason or reason)] += 1
            if stuck := session.running_stages():
                running = set(self._still_running())
                kept = [entry for entry in self._left_behind if entry[:2] in running]
                added = [(session.stream_id, name, weakref.ref(stage)) for name, stage in stuck.items()]
                self._left_behind = kept + added
            self._sessions.pop(session.stream_id, None)
            self._tasks.pop(session.stream_id, None)
            trim_memory()  # what the session freed goes back to the system, not just to malloc
            self._on_ended()
        return reason

"""Worker processes for the processor (``--isolation process``): start, assign, watch, restart, recycle.

Each worker runs the processor's ``setup()`` once and then serves any number of sessions
(byoc/isolation/child.py). A session is given the ready worker with the fewest sessions. A worker that
dies (a segfault, an abort, ``os._exit``, the OOM killer) ends only its own sessions — their links break
(byoc/isolation/remote.py) — and a fresh worker is started in its place; meanwhile the pool offers the
capacity of the workers that are ready. A worker is *recycled* when its memory grew past the leak
threshold since its idle baseline, or when it served its share of sessions: a fresh worker is started
and, once it is ready, takes every new session while the old one finishes its own and exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from byoc.errors import ProcessorLoadError, ProcessorLost
from byoc.isolation import child
from byoc.isolation.remote import RemoteAudioProcessor, RemoteProcessor
from byoc.serve.system import resident_bytes

__all__ = ["PoolSettings", "Worker", "WorkerPool", "exit_cause", "recycle_reason"]

log = logging.getLogger(__name__)

_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
_READY_POLL_S = 0.05
_DEATH_WAIT_S = 2.0
_TEARDOWN_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class PoolSettings:
    reference: str
    options: dict[str, str]
    workers: int = 1
    log_level: str = "INFO"
    nice: int = 0
    leak_threshold_bytes: int = 0
    """Resident bytes this far above the worker's idle baseline, seen while it is idle: recycle (0: never)."""
    recycle_after_sessions: int = 0
    reply_timeout_s: float | None = None
    """How long a session waits for a hook's answer from its worker (byoc.isolation.remote)."""


@dataclass(eq=False)
class Worker:
    """One worker process and what the pool knows of it."""

    number: int
    process: Any  # multiprocessing's SpawnProcess
    control: Connection
    authkey: bytes
    address: str = ""
    ready: bool = False
    recycling: bool = False
    """A successor is being started."""
    retiring: bool = False
    """Its successor is ready: it takes no new sessions and exits once its own have ended."""
    dead: bool = False
    sessions: int = 0
    served: int = 0
    baseline_rss: int = 0
    baseline_device: int = 0
    cause: str = ""
    ended: threading.Event = field(default_factory=threading.Event)

    def rss(self) -> int:
        return resident_bytes(self.process.pid)


def recycle_reason(drift: int, idle: bool, served: int, threshold: int, after_sessions: int) -> str:
    """Why a processor should be recycled (both isolations): ``leak`` when, idle, its memory is more than
    ``threshold`` bytes above its idle baseline; ``sessions`` once it has served ``after_sessions``;
    "" when neither (a 0 limit is off)."""
    if threshold and idle and drift > threshold:
        return "leak"
    if after_sessions and served >= after_sessions:
        return "sessions"
    return ""


def exit_cause(exitcode: int | None) -> str:
    """``signal 11 (SIGSEGV)``, ``exit code 3``: how a process ended."""
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
        return f"signal {-exitcode} ({name})"
    return f"exit code {exitcode}"


class WorkerPool:
    """The worker processes of one container, safe to use from any thread."""

    def __init__(
        self,
        settings: PoolSettings,
        *,
        on_restart: Callable[[str], None] = lambda reason: None,
        on_recycle: Callable[[str, int], None] = lambda reason, drift: None,
        device_bytes: Callable[[int], int] = lambda pid: 0,
    ) -> None:
        """``device_bytes(pid)``: GPU memory a worker process holds (byoc.serve.gpu), compared like its
        resident memory."""
        self.settings = settings
        self._device_bytes = device_bytes
        self._on_restart = on_restart
        self._on_recycle = on_recycle
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._workers: list[Worker] = []
        self._numbers = 0
        self._closing = False
        self._custom_audio = False
        self._watcher: threading.Thread | None = None
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)

    # --- start and stop (any thread; blocking) ------------------------------------------------------

    def start(self) -> None:
        """Start every worker and wait until each ran ``setup()``; ProcessorLoadError if one failed."""
        starting = [self._spawn() for _ in range(self.settings.workers)]
        for worker in starting:
            self._await_ready(worker, fatal=True)
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)
        self._watcher.start()

    def processor(self) -> RemoteProcessor:
        """The processor sessions are given."""
        kind = RemoteAudioProcessor if self._custom_audio else RemoteProcessor
        return kind(self, self.settings.reply_timeout_s)

    def close(self, timeout: float = _TEARDOWN_WAIT_S) -> None:
        """Tear every worker down (the processor's ``teardown()``), killing those that do not exit."""
        with self._lock:
            self._closing = True
            workers = list(self._workers)
        self._wake_w.send(None)
        deadline = time.monotonic() + timeout
        for worker in workers:
            self._teardown(worker, deadline)
        if self._watcher is not None:
            self._watcher.join(1.0)

    # --- what the runtime asks ------------------------------------------------------------------

    def ready_workers(self) -> tuple[int, int]:
        """(ready, wanted): the workers that take sessions now, and how many there should be."""
        with self._lock:
            ready = sum(1 for w in self._workers if w.ready and not w.retiring and not w.dead)
        return ready, self.settings.workers

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers if not w.dead]

    # --- what the remote processor asks (session threads) ---------------------------------------------

    def assign(self) -> Worker:
        """The ready worker with the fewest sessions."""
        with self._lock:
            candidates = [w for w in self._workers if w.ready and not w.retiring and not w.dead]
            if not candidates:
                raise ProcessorLost("no processor worker is ready (one is being started)")
            worker = min(candidates, key=lambda w: (w.sessions, w.number))
            worker.sessions += 1
            return worker

    def released(self, worker: Worker) -> None:
        """A session of ``worker`` ended: recycle the worker when it has grown or served its share."""
        with self._lock:
            worker.sessions -= 1
            worker.served += 1
            if worker.dead or worker.retiring or self._closing:
                self._retire_if_idle(worker)
                return
            reason, drift = self._recycle_reason(worker)
        if reason:
            self._recycle(worker, reason, drift)

    def death_cause(self, worker: Worker) -> str:
        """How ``worker`` ended, once the watcher has seen it end (briefly waited for)."""
        worker.ended.wait(_DEATH_WAIT_S)  # the watcher reaps it and records how it ended
        return worker.cause or "unknown"

    # --- internals ------------------------------------------------------------------------------------

    def _spawn(self) -> Worker:
        with self._lock:
            self._numbers += 1
            number = self._numbers
        ours, theirs = self._context.Pipe()
        authkey = secrets.token_bytes(16)
        s = self.settings
        spec: child.WorkerSpec = (s.reference, s.options, number, s.log_level, authkey, s.nice)
        process = self._context.Process(
            target=child.main, args=(spec, theirs), name=f"byoc-worker-{number}", daemon=True
        )
        process.start()
        theirs.close()
        worker = Worker(number, process, ours, authkey)
        with self._lock:
            self._workers.append(worker)
        log.info("processor worker %d starting (pid %d)", number, process.pid)
        return worker

    def _await_ready(self, worker: Worker, *, fatal: bool) -> bool:
        """Wait for ``worker``'s ready message; False (or ProcessorLoadError when ``fatal``) if it failed."""
        try:
            message = worker.control.recv()
        except (EOFError, OSError):
            worker.process.join(_DEATH_WAIT_S)
            message = ("failed", f"the worker died while loading: {exit_cause(worker.process.exitcode)}")
        if message[0] != "ready":
            self._forget(worker)
            text = f"processor worker {worker.number} could not load the processor: {message[1]}"
            if fatal:
                raise ProcessorLoadError(text)
            log.error("%s", text)
            return False
        _, worker.address, custom_audio = message
        self._custom_audio = custom_audio
        worker.baseline_rss = worker.rss()
        worker.baseline_device = self._device_bytes(worker.process.pid)
        with self._lock:
            worker.ready = True
        self._wake_w.send(None)
        log.info(
            "processor worker %d ready (pid %d, %d MiB resident)",
            worker.number,
            worker.process.pid,
            worker.baseline_rss >> 20,
        )
        return True

    def _forget(self, worker: Worker) -> None:
        """Drop an ended worker (once: the watcher and a teardown may both get here)."""
        with self._lock:
            if worker not in self._workers:
                return
            worker.dead = True
            self._workers.remove(worker)
        worker.control.close()
        worker.ended.set()

    def _watch(self) -> None:
        """Wait for any worker to end; a worker that ends by itself is replaced."""
        while True:
            with self._lock:
                if self._closing:
                    return
                sentinels = {w.process.sentinel: w for w in self._workers if w.ready and not w.dead}
            ready = multiprocessing.connection.wait([*sentinels, self._wake_r])
            for item in ready:
                if item is self._wake_r:
                    self._wake_r.recv()
                    continue
                worker = sentinels[item]
                worker.process.join()
                with self._lock:
                    closing, retiring = self._closing, worker.retiring
                    worker.cause = exit_cause(worker.process.exitcode)
                if closing or retiring:  # it was told to go (or its successor is already there)
                    self._forget(worker)
                    continue
                log.error(
                    "processor worker %d (pid %d) died: %s; its %d sessions end, a new worker starts",
                    worker.number,
                    worker.process.pid,
                    worker.cause,
                    worker.sessions,
                )
                self._forget(worker)
                self._on_restart(_reason(worker.process.exitcode))
                threading.Thread(target=self._replace, name="worker-restart", daemon=True).start()

    def _replace(self) -> None:
        """Start a worker in place of one that died, retrying (with back-off) while loads fail."""
        for attempt in range(10**9):
            if self._closing:
                return
            if self._await_ready(self._spawn(), fatal=False):
                return
            time.sleep(_RESTART_BACKOFF_S[min(attempt, len(_RESTART_BACKOFF_S) - 1)])

    def _recycle_reason(self, worker: Worker) -> tuple[str, int]:
        """(reason, drift) when ``worker`` should be recycled, ("", drift) when not. Lock held."""
        s = self.settings
        device = self._device_bytes(worker.process.pid) - worker.baseline_device
        drift = max(worker.rss() - worker.baseline_rss, device)
        idle = worker.sessions == 0
        reason = recycle_reason(drift, idle, worker.served, s.leak_threshold_bytes, s.recycle_after_sessions)
        return reason, drift

    def _recycle(self, worker: Worker, reason: str, drift: int) -> None:
        """Start a successor; once it is ready, ``worker`` takes no new sessions and exits when idle.
        Until then it keeps taking sessions, so that none is refused."""
        with self._lock:
            if worker.recycling:
                return
            worker.recycling = True
        log.warning(
            "processor worker %d recycled (%s): %d MiB above its idle baseline after %d sessions",
            worker.number,
            reason,
            drift >> 20,
            worker.served,
        )
        self._on_recycle(reason, drift)
        threading.Thread(target=self._succeed, args=(worker,), name="worker-recycle", daemon=True).start()

    def _succeed(self, worker: Worker) -> None:
        self._replace()
        with self._lock:
            worker.retiring = True
            self._retire_if_idle(worker)

    def _retire_if_idle(self, worker: Worker) -> None:
        """Lock held: tell a retiring worker with no session left to tear down."""
        if worker.retiring and worker.sessions == 0 and not worker.dead:
            threading.Thread(
                target=self._teardown, args=(worker, time.monotonic() + _TEARDOWN_WAIT_S), daemon=True
            ).start()

    def _teardown(self, worker: Worker, deadline: float) -> None:
        if worker.process.exitcode is None:
            with contextlib.suppress(OSError):
                worker.control.send(("teardown",))
            worker.process.join(max(0.1, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                log.error("processor worker %d did not exit after teardown: killed", worker.number)
                worker.process.kill()
                worker.process.join(1.0)
        self._forget(worker)
        log.info("processor worker %d ended: %s", worker.number, exit_cause(worker.process.exitcode))


def _reason(exitcode: int | None) -> str:
    """The ``reason`` label of a restart: ``signal_11``, ``exit_1``."""
    if exitcode is None:
        return "unknown"
    return f"signal_{-exitcode}" if exitcode < 0 else f"exit_{exitcode}"

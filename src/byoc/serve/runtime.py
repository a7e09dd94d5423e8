"""The container runtime: start-up, serving, and an ordered drain on SIGTERM.

``Runtime(settings).serve()`` listens at once (``/health`` says LOADING), loads the processor on a
thread of its own, offers itself to the orchestrator through the protocol adapter ``--protocol`` names
(byoc.serve.protocols), and serves until SIGTERM/SIGINT or :meth:`request_drain` (or the ``shutdown``
awaitable, for tests and tools). The drain, all within ``drain_timeout_s``:

1. mark DRAINING — ``/health`` answers 503 and new starts get 503;
2. withdraw from the orchestrator (the adapter: unregister, or announce a status that is not ready);
3. stop every session: encoders flush, the last segments and a final event go out, publish channels
   are DELETEd;
4. the adapter's last word (the live runner unregisters); tear the processor down and stop listening;
   exit 0.

Past the deadline whatever is left is cancelled and the exit code is 1, with a log line naming what
hung. A second signal exits at once. A stop while the processor is still loading (its import or
``setup()``) does not wait for it: the load is abandoned on its thread, logged, and the exit code is 1.

With ``--gpu INDEX`` the process is pinned to that device before anything else (byoc.serve.gpu): CUDA
shows only it, the GPU readings are its own, and an index NVML does not see ends the start with
``EXIT_CONFIG``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from byoc import __version__
from byoc.errors import ByocError, ConfigError
from byoc.isolation.pool import PoolSettings, WorkerPool, recycle_reason
from byoc.processor import Processor, load_processor
from byoc.serve.api import build_app, health_answer
from byoc.serve.apiserver import ApiServer
from byoc.serve.config import Settings
from byoc.serve.connections import connection_limits
from byoc.serve.control import RuntimeControl, api_settings
from byoc.serve.gpu import (
    DeviceMemory,
    GpuMonitor,
    MemoryBudget,
    TorchMemory,
    cuda_initialised,
    device_label,
    pin_cuda_environment,
    torch_memory,
)
from byoc.serve.health import HealthView, RuntimeState
from byoc.serve.manager import SessionManager
from byoc.serve.metrics import FrameTotals, RuntimeMetrics
from byoc.serve.protocols import Offer, ProtocolAdapter, create_adapter
from byoc.serve.system import memory_limit, resident_bytes
from byoc.serve.validation import ChannelPolicy, channel_policy
from byoc.tensors import release_cached_memory
from byoc.threads import run_in_thread
from byoc.trickle.client import create_client_session

__all__ = ["EXIT_CONFIG", "EXIT_HUNG", "EXIT_LOAD_FAILED", "Runtime"]

log = logging.getLogger(__name__)

EXIT_HUNG = 1
EXIT_CONFIG = 2
EXIT_LOAD_FAILED = 3
_MB = 1024 * 1024
_BUDGET_SAMPLE_S = 2.0
_HEARTBEAT_S = 0.5
_STALL_S = 5.0
_REPLY_MARGIN_S = 2.0


class Runtime:
    """One container: its HTTP server, processor, sessions, metrics and registration."""

    def __init__(
        self, settings: Settings, *, processor: Processor | None = None, gpu: GpuMonitor | None = None
    ) -> None:
        self.settings = settings
        self._processor = processor
        self.gpu = gpu or GpuMonitor()
        per_session = settings.gpu_memory_per_session_mb
        self.budget = MemoryBudget(
            self.gpu,
            per_session_bytes=None if per_session is None else int(per_session * _MB),
            headroom_bytes=int(settings.gpu_headroom_mb * _MB),
            device=settings.gpu or 0,
        )
        self.metrics = RuntimeMetrics(self, version=__version__, processor=settings.processor)
        self._loading = True
        self._draining = False
        self._error: str | None = None
        self._started = time.monotonic()
        self._loading_step = "import"
        self._manager: SessionManager | None = None
        self._adapter: ProtocolAdapter | None = None
        self._drain_requested = asyncio.Event()
        self.port: int | None = None
        """The port actually bound (useful with port 0)."""
        self._listening = asyncio.Event()
        self._ready = asyncio.Event()
        self._api: ApiServer | None = None
        self._heartbeat = time.monotonic()
        self._pool: WorkerPool | None = None
        """The worker processes that run the processor with ``isolation`` process."""
        self._idle_rss = self._idle_device = 0
        """This process's resident and GPU memory once the processor was set up (thread isolation)."""
        self._recycling = False
        if settings.isolation == "process" and processor is not None:
            raise ConfigError("isolation process loads the processor by reference in its workers")

    # --- state (read by /health, /metrics and admission; never waits) ---------------------------

    @property
    def manager(self) -> SessionManager:
        if self._manager is None:
            raise RuntimeError("the runtime is not serving")
        return self._manager

    def _stalled_for(self) -> float:
        return time.monotonic() - self._heartbeat

    def _problem(self) -> str | None:
        """Why the runtime is in ERROR: a failed load, a stalled main loop, or more threads stuck in the
        processor than ``max_abandoned_threads``; None when there is nothing wrong."""
        if self._error is not None:
            return self._error
        if self._stalled_for() > _STALL_S:
            return f"the main event loop has not run for {self._stalled_for():.1f}s"
        return self._manager.poisoned() if self._manager is not None else None

    def runtime_state(self) -> RuntimeState:
        if self._problem() is not None:
            return RuntimeState.ERROR
        if self._loading:
            return RuntimeState.LOADING
        if self._draining:
            return RuntimeState.DRAINING
        return RuntimeState.OK if self.sessions_active() else RuntimeState.IDLE

    def health_view(self) -> HealthView:
        registration = self._adapter.state if self._adapter is not None else None
        return HealthView(
            self.runtime_state(),
            self.sessions_active(),
            self._sessions_allowed(),
            time.monotonic() - self._started,
            self._problem(),
            registration,
            self._manager.abandoned_threads() if self._manager is not None else 0,
        )

    def sessions_active(self) -> int:
        return len(self._manager) if self._manager is not None else 0

    def capacity(self) -> int:
        return self._sessions_allowed()

    def state(self) -> str:
        return str(self.runtime_state())

    def offer(self) -> Offer:
        running = self.sessions_active()
        refusal = self._problem() or self._admission_gate()
        capacity = self._sessions_allowed() if refusal is None else running
        return Offer(self.runtime_state(), running, capacity, refusal)

    def advertised_url(self) -> str:
        return self.settings.advertised_url(self.port)

    def gpu_devices(self) -> Sequence[DeviceMemory]:
        return self.gpu.devices()

    def torch_devices(self) -> Sequence[TorchMemory]:
        return torch_memory(self.settings.gpu)

    def memory_limit(self) -> tuple[int, str]:
        return memory_limit()

    def frame_totals(self) -> FrameTotals:
        return self._manager.totals() if self._manager is not None else FrameTotals()

    def _sessions_allowed(self) -> int:
        """``max_sessions``, or its share for the worker processes that are ready while one restarts."""
        if self._pool is None:
            return self.settings.max_sessions
        ready, wanted = self._pool.ready_workers()
        return self.settings.max_sessions * ready // wanted

    def _admission_gate(self) -> str | None:
        if self._error is not None:
            return f"the runtime is broken: {self._error}"
        if self._loading:
            return "the processor is still loading"
        if self._draining:
            return "shutting down"
        if self._recycling:
            return "recycling the processor: this container drains and exits for a fresh one"
        if self._pool is not None and self.sessions_active() >= (allowed := self._sessions_allowed()):
            ready, wanted = self._pool.ready_workers()
            return f"{ready} of {wanted} processor workers ready (one is starting): {allowed} sessions"
        return self.budget.refusal()

    # --- control --------------------------------------------------------------------------------

    async def wait_listening(self) -> None:
        """Return once the HTTP server accepts connections (``serve`` must be running)."""
        await self._listening.wait()

    async def wait_ready(self) -> None:
        """Return once the processor is loaded and sessions are accepted."""
        await self._ready.wait()

    def request_drain(self) -> None:
        """Start the ordered shutdown (what SIGTERM does): from now on /health and starts say 503."""
        self._draining = True
        self._drain_requested.set()
        self.health_changed()

    def health_changed(self) -> None:
        """Pass a change that no request made on to the listener process's ``/health`` at once."""
        if self._api is not None:
            self._api.health_changed()

    async def serve(self, shutdown: Awaitable[object] | None = None) -> int:
        """Serve until SIGTERM/SIGINT, :meth:`request_drain` or ``shutdown``; returns the exit code."""
        if self.settings.gpu is not None and not self._pin_gpu(self.settings.gpu):
            return EXIT_CONFIG
        self._install_signal_handlers()
        sys.setswitchinterval(self.settings.switch_interval_ms / 1000.0)
        async with create_client_session(self.settings.trickle()) as http:
            self._manager = SessionManager(
                self._processor,
                http,
                self.settings.session(),
                _Observer(self.metrics, self._out_of_memory),
                max_sessions=self.settings.max_sessions,
                gate=self._admission_gate,
                start_timeout_s=self.settings.start_timeout_s,
                max_abandoned_threads=self.settings.max_abandoned_threads,
                on_ended=self._session_ended,
            )
            control = RuntimeControl(
                self._manager,
                asyncio.get_running_loop(),
                settings=api_settings(self.settings),
                health=self.health_view,
                metrics=self.metrics,
            )
            limits = connection_limits(
                max_connections=self.settings.api_max_connections,
                max_sessions=self.settings.max_sessions,
                header_timeout_s=self.settings.api_header_timeout_s,
            )
            self._adapter = create_adapter(
                self.settings, http=http, control=control, view=self, api_loop=lambda: self._api_loop()
            )
            app = build_app(control, self._adapter.routes())
            self._api = ApiServer(
                app,
                self.settings.host,
                self.settings.port,
                limits,
                health=(lambda: health_answer(control)) if self.settings.api_listener == "process" else None,
                log_level=self.settings.log_level,
            )
            self.port = await self._api.start()
            await self._guard_channels(control, self.port)
            log.info(
                "listening on %s:%s (processor %s)", self.settings.host, self.port, self.settings.processor
            )
            self._listening.set()
            try:
                return await self._serve(http, shutdown)
            finally:
                await self._api.stop()

    def _pin_gpu(self, index: int) -> bool:
        """``--gpu``: read only that device, and show CUDA only that one (as ``cuda:0``) before the
        processor is imported; worker processes inherit the environment. False, with the reason logged,
        when NVML has no such device."""
        try:
            self.gpu.pin(index)
        except ConfigError as exc:
            self._error = str(exc)
            log.error("byoc serve: %s", exc)
            return False
        replaced = pin_cuda_environment(index, os.environ)
        if replaced is not None:
            log.warning("gpu %d: CUDA_VISIBLE_DEVICES was %r; it is now %d", index, replaced, index)
        if cuda_initialised():
            log.warning("gpu %d: CUDA was initialised before the pinning and may see every device", index)
        log.info("pinned to %s (CUDA_VISIBLE_DEVICES=%d)", device_label(index, self.gpu.devices()), index)
        return True

    def _api_loop(self) -> asyncio.AbstractEventLoop:
        if self._api is None:
            raise RuntimeError("the runtime is not serving")
        return self._api.loop

    async def _guard_channels(self, control: RuntimeControl, port: int) -> None:
        """Tell the API which hosts a start's channel URLs may name, now that its port is known
        (docs/protocol.md §2.9); warn when any host is allowed and anyone may call the API."""
        settings, built = self.settings, list[ChannelPolicy]()

        def build() -> None:  # resolves this machine's host name: off the event loop
            rules = settings.channel_host_rules()
            built.append(
                channel_policy(
                    rules,
                    orchestrator_url=settings.orchestrator_url,
                    listen_host=settings.host,
                    api_port=port,
                    advertised_url=settings.advertised_url(),
                )
            )

        await run_in_thread(build, "channel-policy")
        control.guard_channels(built[0])
        warning = built[0].exposure_warning(settings.host, token=bool(settings.bearer_token()))
        if warning:
            log.warning("%s", warning)

    async def _serve(self, http: aiohttp.ClientSession, shutdown: Awaitable[object] | None) -> int:
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._drain_requested.wait())]
        if shutdown is not None:
            waiters.append(asyncio.ensure_future(shutdown))
        try:
            return await self._load_and_serve(http, waiters)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _load_and_serve(self, http: aiohttp.ClientSession, waiters: list[asyncio.Future[Any]]) -> int:
        """Load the processor (a stop meanwhile abandons the load), then serve until a waiter is done."""
        load = asyncio.ensure_future(self._load())
        await asyncio.wait([load, *waiters], return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            return await self._abandon_load(load)
        try:
            load.result()
        except Exception as exc:
            self._error = f"processor failed to load: {exc}"
            self.health_changed()
            log.error("%s", self._error, exc_info=not isinstance(exc, ByocError))
            return EXIT_LOAD_FAILED
        async with asyncio.TaskGroup() as tasks:
            background = [
                tasks.create_task(self._sample_gpu_budget(), name="gpu-budget"),
                tasks.create_task(self._beat(), name="heartbeat"),
            ]
            if self._adapter is not None:
                background.append(tasks.create_task(self._adapter.run(), name="protocol"))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                return await self._drain()
            finally:
                for task in background:
                    task.cancel()

    async def _load(self) -> None:
        reference, options = self.settings.processor, self.settings.processor_options
        started = time.monotonic()
        log.info("loading processor %s", reference)
        if self.settings.isolation == "process":
            await self._start_workers()
            self._loading = False
            self._ready.set()
            self.health_changed()
            log.info("processor %s ready in %.2fs (process isolation)", reference, time.monotonic() - started)
            return
        if self._processor is None:
            loaded: list[Processor] = []
            self._loading_step = "import"
            await run_in_thread(lambda: loaded.append(load_processor(reference, options)), "processor-import")
            self._processor = loaded[0]
        processor = self._processor
        self._loading_step = "setup"
        log.info("processor %s: setup() running", reference)
        await run_in_thread(processor.setup, "processor-setup")
        self.budget.set_baseline()
        self._idle_rss, self._idle_device = resident_bytes(), self.gpu.process_bytes(os.getpid())
        self.manager.processor = processor
        self._loading = False
        self._ready.set()
        self.health_changed()
        log.info("processor %s ready in %.2fs", reference, time.monotonic() - started)

    async def _start_workers(self) -> None:
        """``isolation`` process: the processor loads and runs in worker processes (byoc.isolation)."""
        s = self.settings
        workers = s.isolation_workers or max(1, len(self.gpu.devices()))
        pool = WorkerPool(
            PoolSettings(
                s.processor,
                s.processor_options,
                workers=workers,
                log_level=s.log_level,
                nice=s.thread_nice,
                leak_threshold_bytes=int(s.leak_threshold_mb * _MB),
                recycle_after_sessions=s.recycle_after_sessions,
                # past the watchdogs (process_timeout_s, start_timeout_s), the session's thread stops
                # waiting for a hook that hangs in a worker rather than being left behind
                reply_timeout_s=max(s.process_timeout_s, s.start_timeout_s) + _REPLY_MARGIN_S
                if s.process_timeout_s
                else None,
            ),
            on_restart=self.metrics.worker_restarted,
            on_recycle=lambda reason, drift: self.metrics.processor_recycled(reason),
            device_bytes=self.gpu.process_bytes,
        )
        self._loading_step = "setup"
        log.info("processor %s: starting %d worker processes", s.processor, workers)
        await run_in_thread(pool.start, "processor-workers")
        self._pool = pool
        self.budget.set_baseline()
        self.manager.processor = pool.processor()

    def _out_of_memory(self) -> None:
        """A session's processor ran out of memory (any thread): the allocator's cache goes back to the
        device, and admission takes a session to cost what filled it (byoc.serve.gpu.MemoryBudget)."""
        release_cached_memory()
        cost = self.budget.out_of_memory(self.sessions_active())
        if cost is not None:
            log.warning(
                "out of memory with %d sessions: a session now counts as %d MiB in admission",
                self.sessions_active(),
                cost // _MB,
            )

    def _session_ended(self) -> None:
        """After a session: in thread isolation, a processor that leaked past ``leak_threshold_mb``
        (seen while idle) or served ``recycle_after_sessions`` is recycled. The container takes no new
        session, and once the running ones have ended it drains and exits 0, for its supervisor to start a
        fresh one. Worker processes recycle themselves (byoc.isolation)."""
        self.health_changed()
        if self._pool is not None or self._draining or self._manager is None:
            return
        if not self._recycling:
            s, started = self.settings, self._manager.totals().sessions_started
            device = self.gpu.process_bytes(os.getpid()) - self._idle_device
            drift = max(resident_bytes() - self._idle_rss, device)
            idle, threshold = not self.sessions_active(), int(s.leak_threshold_mb * _MB)
            reason = recycle_reason(drift, idle, started, threshold, s.recycle_after_sessions)
            if not reason:
                return
            self._recycling = True
            self.metrics.processor_recycled(reason)
            log.warning(
                "recycling the processor (%s): %d MiB above the idle baseline after %d sessions; no new "
                "sessions, and the container exits 0 once the %d running have ended",
                reason,
                drift // _MB,
                started,
                self.sessions_active(),
            )
        if not self.sessions_active():
            log.info("recycling: draining and exiting 0 for the supervisor to start a fresh container")
            self.request_drain()

    async def _abandon_load(self, load: asyncio.Future[None]) -> int:
        """Stop while the processor is still loading: nothing is served yet, so nothing is drained.

        The import or ``setup()`` runs on a daemon thread that cannot be interrupted; it is left
        behind (``teardown()`` is not called, as ``setup()`` never finished) and the process exits
        at once with ``EXIT_HUNG``, well within the drain deadline.
        """
        self._draining = True
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        log.error(
            "stopped while loading: the processor's %s was abandoned on thread processor-%s "
            "(teardown() is not called); exit code %d",
            "import" if self._loading_step == "import" else "setup()",
            self._loading_step,
            EXIT_HUNG,
        )
        return EXIT_HUNG

    async def _beat(self) -> None:
        """Proof for /health (served on another thread) that the main loop is alive."""
        while True:
            self._heartbeat = time.monotonic()
            await asyncio.sleep(_HEARTBEAT_S)

    async def _sample_gpu_budget(self) -> None:
        if not self.gpu.available:
            return
        while True:
            self.budget.observe(self.sessions_active())
            await asyncio.sleep(_BUDGET_SAMPLE_S)

    async def _drain(self) -> int:
        budget = self.settings.drain_budget()
        deadline = time.monotonic() + budget.total_s
        self._draining = True
        log.info("draining: %d sessions, %.1fs to go", self.sessions_active(), budget.total_s)
        if self._adapter is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(budget.unregister_s):
                    await self._adapter.withdraw()
        code = 0
        hung = await self.manager.drain(timeout=budget.sessions_wait_s(deadline - time.monotonic()))
        for stream_id, stages in self.manager.stuck_stages().items():
            log.error(
                "stream %s: the %s thread was still busy at the deadline and was left behind",
                stream_id,
                " and ".join(stages),
            )
            code = EXIT_HUNG
        if hung:
            log.error("drain deadline: sessions %s did not end; cancelling them", ", ".join(hung))
            code = EXIT_HUNG
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(budget.cancel_wait_s(deadline - time.monotonic())):
                    await self.manager.cancel_all()
        if self._adapter is not None:
            remaining = budget.teardown_wait_s(deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(budget.unregister_s, remaining)):
                    await self._adapter.close()
        if self._pool is not None:
            pool, wait_s = self._pool, budget.teardown_wait_s(deadline - time.monotonic())
            await run_in_thread(lambda: pool.close(wait_s), "processor-workers-teardown")
        elif self._processor is not None:
            try:
                async with asyncio.timeout(budget.teardown_wait_s(deadline - time.monotonic())):
                    await run_in_thread(self._processor.teardown, "processor-teardown")
            except TimeoutError:
                log.error("drain deadline: the processor's teardown() did not return")
                code = EXIT_HUNG
            except Exception:
                log.exception("the processor's teardown() failed")
        log.info(
            "drained in %.2fs, exit code %d",
            budget.total_s - (deadline - time.monotonic()),
            code,
        )
        return code

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        received: list[int] = []

        def on_signal(number: int) -> None:
            received.append(number)
            if len(received) == 1:
                log.info("%s received: draining (a second signal exits at once)", signal.Signals(number).name)
                self.request_drain()
            else:
                log.warning("second signal: exiting now")
                logging.shutdown()
                os._exit(EXIT_HUNG)

        for number in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(number, on_signal, number)


class _Observer:
    """What sessions report (byoc.session.SessionObserver): to the metrics, and an out-of-memory error to
    the runtime as well."""

    def __init__(self, metrics: RuntimeMetrics, out_of_memory: Callable[[], None]) -> None:
        self._metrics, self._out_of_memory = metrics, out_of_memory

    def frame_done(self, latency_s: float) -> None:
        self._metrics.frame_done(latency_s)

    def processed(self, seconds: float) -> None:
        self._metrics.processed(seconds)

    def error(self, kind: str) -> None:
        self._metrics.error(kind)
        if kind == "oom":
            self._out_of_memory()

"""Hand-offs between event loops and threads: the one place that crosses that line.

The house rule these helpers serve (docs/architecture.md): sessions and the session manager are
mutated only on the runtime's main loop; other threads (the HTTP API, the media and processing
stages, user code) hand work over with :func:`call_in_loop` or :func:`run_on_loop` and read snapshots.
Threads started here carry the starting thread's context variables (the stream id in log lines),
which plain ``threading.Thread`` does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["call_in_loop", "run_in_thread", "run_on_loop", "start_thread"]

T = TypeVar("T")


def call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    """Schedule ``callback(*args)`` on ``loop`` from another thread; nothing if the loop is gone.

    A stage left behind in user code (a hung processor) may finish long after its session — even after
    the loop it reports to was closed — and must not fail then.
    """
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


async def run_on_loop(loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` on ``loop`` (another thread's) and await its result from the calling loop."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))


def start_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """Start a daemon thread that runs ``target`` in a copy of the caller's context."""
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(target,), name=name, daemon=True)
    thread.start()
    return thread


async def run_in_thread(call: Callable[[], object], name: str) -> None:
    """Run user code on a daemon thread of its own (a coroutine gets its own loop there) and await it.

    Unlike the default executor, a call that never returns cannot keep the process from exiting.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def target() -> None:
        try:
            result = call()
            if inspect.isawaitable(result):
                asyncio.run(_await(result))
        except BaseException as exc:
            call_in_loop(loop, _settle, done, exc)
        else:
            call_in_loop(loop, _settle, done, None)

    start_thread(target, name)
    await done


async def _await(awaitable: Awaitable[object]) -> None:
    await awaitable


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)

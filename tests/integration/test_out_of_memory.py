"""Out of memory in one session (docs/architecture.md, "Process isolation"): that session's frames fail,
never the container, and admission learns that a session costs more than it thought."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager

import aiohttp

from byoc.dev.trickle_server import RunningTrickle
from byoc.serve.gpu import GpuMonitor
from byoc.serve.runtime import Runtime
from tests.integration.test_api import body_for, running
from tests.processors import OutOfMemoryOnRequest
from tests.support import StreamHarness, make_segments
from tests.unit.test_gpu import GIB, FakeNvml, one_gpu


def serving(nvml: FakeNvml) -> AbstractAsyncContextManager[tuple[Runtime, str]]:
    # what the author thought a session costs: 1 GiB; failures never end the session here
    options = {"max_sessions": 4, "max_consecutive_errors": 1000, "gpu_memory_per_session_mb": 1024}
    return running(OutOfMemoryOnRequest(), gpu=GpuMonitor(nvml), **options)


def cost(runtime: Runtime) -> int | None:
    """What admission takes one session to cost on the GPU."""
    return runtime.budget.per_session_bytes


async def start(http: aiohttp.ClientSession, base: str, h: StreamHarness, **params: object) -> int:
    body = body_for(h, params=params or None)
    async with http.post(f"{base}/stream/start", json=body, headers={"X-Stream-Id": h.name}) as response:
        return response.status


async def test_out_of_memory_fails_that_sessions_frames_and_admission_learns_the_cost(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    nvml = one_gpu(used=10 * GIB, total=80 * GIB)
    segments = make_segments(1, frames=10)
    async with (
        serving(nvml) as (runtime, base),
        StreamHarness(trickle, http, "hungry") as hungry,
        StreamHarness(trickle, http, "modest") as modest,
        StreamHarness(trickle, http, "late") as late,
    ):
        await runtime.wait_ready()
        assert cost(runtime) == 1 * GIB
        assert await start(http, base, hungry, oom=True) == 200
        assert await start(http, base, modest) == 200
        nvml.devices[0].used = 79 * GIB  # the wall the hungry session ran into
        await asyncio.gather(hungry.publish(segments), modest.publish(segments))
        await asyncio.gather(hungry.input.close(), modest.input.close())
        await asyncio.gather(hungry.readers_done(), modest.readers_done())
        hungry_end, modest_end = hungry.events[-1]["event"], modest.events[-1]["event"]
        assert hungry_end["statistics"]["errors"] == {"oom": 10}, hungry_end
        assert hungry_end["statistics"]["output"]["frames"] == 0
        assert modest_end["statistics"]["errors"] == {}, modest_end
        assert modest_end["statistics"]["output"]["frames"] == 10
        # two sessions filled the 70 GiB above the baseline: a session is taken to cost 35 GiB from now on
        assert cost(runtime) == 35 * GIB
        nvml.devices[0].used = 50 * GIB  # 30 GiB free: room for 1 GiB sessions, not for 35 GiB ones
        assert await start(http, base, late) == 503
        assert runtime.runtime_state().name in ("IDLE", "OK")  # the container itself is fine

"""A local development orchestrator: go-livepeer's behaviour towards a BYOC container, on a laptop.

It is a development tool, not a replacement for go-livepeer: it hosts the trickle channels, takes
capability registrations, and starts, updates and stops streams on containers exactly as go-livepeer's
orchestrator would, and (by default) plays the gateway too: it feeds each stream a synthetic input and
reads what comes back. Beside BYOC it speaks go-livepeer's live-runner protocol: runners register by
heartbeat, clients reserve sessions and are proxied to them, and the curl loop runs on a runner's session
too.
"""

from __future__ import annotations

from byoc.dev.orchestrator.app import LocalOrchestrator, OrchestratorSettings
from byoc.dev.orchestrator.live_runner import LiveRunnerRoutes
from byoc.dev.orchestrator.registry import Capability, CapabilityRegistry
from byoc.dev.orchestrator.runner_streams import RunnerStream
from byoc.dev.orchestrator.runners import LiveRunner, RunnerError, RunnerRegistry
from byoc.dev.orchestrator.streams import LocalStream, StreamRequest

__all__ = [
    "Capability",
    "CapabilityRegistry",
    "LiveRunner",
    "LiveRunnerRoutes",
    "LocalOrchestrator",
    "LocalStream",
    "OrchestratorSettings",
    "RunnerError",
    "RunnerRegistry",
    "RunnerStream",
    "StreamRequest",
]

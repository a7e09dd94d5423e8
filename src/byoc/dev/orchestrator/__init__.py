"""A local development orchestrator: go-livepeer's behaviour towards a BYOC container, on a laptop.

It is a development tool, not a replacement for go-livepeer: it hosts the trickle channels, takes
capability registrations, and starts, updates and stops streams on containers exactly as go-livepeer's
orchestrator would, and (by default) plays the gateway too: it feeds each stream a synthetic input and
reads what comes back.
"""

from __future__ import annotations

from byoc.dev.orchestrator.app import LocalOrchestrator, OrchestratorSettings
from byoc.dev.orchestrator.registry import Capability, CapabilityRegistry
from byoc.dev.orchestrator.streams import LocalStream, StreamRequest

__all__ = [
    "Capability",
    "CapabilityRegistry",
    "LocalOrchestrator",
    "LocalStream",
    "OrchestratorSettings",
    "StreamRequest",
]

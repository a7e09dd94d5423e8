"""One live stream: its threads (decode, process, encode), its trickle tasks and its statistics."""

from __future__ import annotations

from byoc.session.session import Session, SessionObserver

__all__ = ["Session", "SessionObserver"]

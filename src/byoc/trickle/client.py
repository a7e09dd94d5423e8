"""What trickle subscribers and publishers share: transport settings and the HTTP client session.

Trickle requests must not have a total timeout: a GET may wait a long time for the first byte of a
segment that has not started, and a pre-connected POST waits for the segment's data. Instead there is a
connect timeout, an idle-read timeout once a body flows, and a refresh period for requests that wait.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field

import aiohttp

from byoc.trickle.protocol import RetryPolicy

__all__ = ["TrickleClientSettings", "create_client_session"]

log = logging.getLogger(__name__)

_insecure_warned = False


@dataclass(frozen=True, slots=True)
class TrickleClientSettings:
    """Transport settings of trickle clients.

    ``verify_tls`` is on by default. go-livepeer orchestrators serve trickle over HTTPS with a
    self-signed certificate; turning verification off for them is an explicit choice, logged once.
    """

    connect_timeout_s: float = 5.0
    idle_read_timeout_s: float = 30.0
    """Longest silence inside a segment body before the connection is treated as broken."""
    preconnect_refresh_s: float = 20.0
    """A GET still waiting for its first byte after this long is re-issued (like go-livepeer)."""
    response_timeout_s: float = 10.0
    """How long a publisher waits for the answer to a POST after its body ended."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    verify_tls: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.preconnect_refresh_s < self.idle_read_timeout_s:
            raise ValueError(
                "preconnect_refresh_s must be positive and below idle_read_timeout_s "
                f"(got {self.preconnect_refresh_s} and {self.idle_read_timeout_s})"
            )


def _warn_insecure_once() -> None:
    global _insecure_warned
    if not _insecure_warned:
        _insecure_warned = True
        log.warning(
            "TLS certificate verification is OFF for trickle and orchestrator requests "
            "(needed for go-livepeer's self-signed certificates); enable it where certificates are valid"
        )


def create_client_session(settings: TrickleClientSettings) -> aiohttp.ClientSession:
    """An HTTP client session for trickle channels: no connection cap, no total timeout."""
    ssl_context: ssl.SSLContext | bool = True
    if not settings.verify_tls:
        _warn_insecure_once()
        ssl_context = False
    connector = aiohttp.TCPConnector(limit=0, ssl=ssl_context, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)

"""What trickle subscribers and publishers share: transport settings and the HTTP client session.

Trickle requests must not have a total timeout: a GET may wait a long time for the first byte of a
segment that has not started, and a pre-connected POST waits for the segment's data. Instead there is a
connect timeout, an idle-read timeout once a body flows, and a refresh period for requests that wait.

Trickle requests never follow redirects (every call passes ``allow_redirects=False``): a channel URL
names the host the container talks to, and a 3xx is a failure like any other unexpected status
(docs/protocol.md §4.4). :class:`HostRule` and :func:`url_address` say which host a URL names, parsed
as aiohttp parses it, for the checks of where the container may connect to.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from byoc.trickle.protocol import RetryPolicy

__all__ = ["HostRule", "TrickleClientSettings", "create_client_session", "host_key", "url_address"]

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


def host_key(host: str) -> str:
    """A host name or IP literal as compared: lower case, no brackets or trailing dot, and IP addresses
    in canonical form, including the legacy IPv4 spellings the resolver accepts (``127.1``,
    ``2130706433``, ``0x7f.0.0.1``) and IPv4-mapped IPv6 addresses."""
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def url_address(url: str) -> tuple[str, int]:
    """The host (as :func:`host_key`) and port an http(s) URL connects to, parsed by yarl as aiohttp
    does (so the check and the request cannot read the URL differently). ValueError when it has none."""
    parsed = URL(url)
    if not parsed.host or parsed.port is None:
        raise ValueError(f"no host or port in {url[:100]!r}")
    return host_key(parsed.host), parsed.port


@dataclass(frozen=True, slots=True)
class HostRule:
    """One allowed host: ``host`` (any port), ``host:port``, ``[v6]:port``, or ``*`` (any host)."""

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> HostRule:
        """ValueError when ``entry`` is not a bare host with an optional port."""
        text = entry.strip()
        if text == "*":
            return cls("*")
        problem = ValueError(f"not a host or host:port: {entry!r}")
        if not text or any(c.isspace() or c in "/@?#\\" for c in text):
            raise problem
        try:
            parsed = URL("http://" + text)
        except ValueError:
            raise problem from None
        if not parsed.host:
            raise problem
        return cls(host_key(parsed.host), parsed.explicit_port)

    def allows(self, host: str, port: int) -> bool:
        """Whether the address ``host`` (as :func:`host_key`), ``port`` is allowed by this rule."""
        if self.host == "*":
            return True
        return self.host == host and self.port in (None, port)

    def __str__(self) -> str:
        if self.port is None:
            return self.host
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

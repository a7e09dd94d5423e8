"""Parsing and validating what the orchestrator sends to the container.

Bad input always gets a clear :class:`~byoc.errors.InvalidRequest` naming the field, and never
reaches a session. Bodies are parsed as JSON whatever their Content-Type says (``curl -d`` sends
``application/x-www-form-urlencoded``; go-livepeer's stop sends none).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from byoc.errors import ConfigError, InvalidRequest
from byoc.params import MAX_PARAMS_BYTES, check_params_size, check_update, max_fps
from byoc.spec import StreamSpec
from byoc.trickle.client import HostRule, host_key, url_address

__all__ = [
    "CHANNEL_FIELDS",
    "MAX_DIMENSION",
    "MAX_ID_LENGTH",
    "MAX_JSON_DEPTH",
    "ChannelPolicy",
    "RequestLimits",
    "channel_policy",
    "checked_stream_id",
    "json_object",
    "params_update",
    "start_spec",
    "stream_id_from_body",
]

MAX_DIMENSION = 4096
MAX_ID_LENGTH = 256
MAX_JSON_DEPTH = 32
"""How deeply a request's JSON may nest (objects and arrays)."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """How much a request may ask for (``--max-params-bytes``, ``--max-output-pixels``)."""

    max_params_bytes: int = MAX_PARAMS_BYTES
    max_output_pixels: int = 1920 * 1080


def _not_finite(text: str) -> float:
    raise ValueError(f"{text} is not a finite number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999
        _not_finite(text)
    return number


def _depth(value: Any) -> int:
    """How deeply ``value`` nests (at most one past :data:`MAX_JSON_DEPTH`), walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_json(raw: bytes | str) -> Any:
    """JSON with finite numbers only, nested at most :data:`MAX_JSON_DEPTH` deep (ValueError if not)."""
    try:
        value = json.loads(raw, parse_constant=_not_finite, parse_float=_finite)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} deep") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} deep")
    return value


def json_object(raw: bytes, what: str = "body") -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        value = _parse_json(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(what, f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidRequest(what, f"must be a JSON object, got {type(value).__name__}")
    return value


def _url(body: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise InvalidRequest(name, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidRequest(name, f"must be a string, got {type(value).__name__}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(name, f"must be an http(s) URL, got {value[:100]!r}")
    return value


def checked_stream_id(value: Any, name: str) -> str:
    """A stream id as every route takes it: 1 to :data:`MAX_ID_LENGTH` printable ASCII characters
    without spaces (``!`` to ``~``), so that an id can never break or rewrite a log line or an event."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(name, "must be a non-empty string")
    if len(value) > MAX_ID_LENGTH or not all("!" <= c <= "~" for c in value):
        raise InvalidRequest(
            name, f"must be 1 to {MAX_ID_LENGTH} printable ASCII characters without spaces (! to ~)"
        )
    return value


def _dimension(params: Mapping[str, Any], name: str) -> int:
    value = params[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise InvalidRequest(f"params.{name}", f"must be an integer, got {value!r}")
    number = int(value)
    if not 16 <= number <= MAX_DIMENSION or number % 2:
        raise InvalidRequest(
            f"params.{name}", f"must be an even number within 16..{MAX_DIMENSION}, got {number}"
        )
    return number


def _params(body: Mapping[str, Any]) -> dict[str, Any]:
    params = body.get("params")
    if params is None:  # go-livepeer sends "params": null when the client gave none
        return {}
    if isinstance(params, str):  # some clients send the params as a JSON string
        params = json_object(params.encode(), "params")
    if not isinstance(params, dict):
        raise InvalidRequest("params", f"must be an object or null, got {type(params).__name__}")
    return params


def _output_size(params: Mapping[str, Any], max_pixels: int) -> tuple[int, int]:
    if ("width" in params) != ("height" in params):
        missing = "height" if "width" in params else "width"
        raise InvalidRequest(f"params.{missing}", "width and height go together")
    width = _dimension(params, "width") if "width" in params else 512
    height = _dimension(params, "height") if "height" in params else 512
    if width * height > max_pixels:
        raise InvalidRequest(
            "params.width", f"{width}x{height} is more than the {max_pixels} pixels an output may have"
        )
    return width, height


_DEFAULT_LIMITS = RequestLimits()


def start_spec(
    body: Mapping[str, Any],
    *,
    header_id: str | None,
    lv2v: bool = False,
    limits: RequestLimits = _DEFAULT_LIMITS,
) -> StreamSpec:
    """A StreamSpec from a BYOC ``/stream/start`` body (or, with ``lv2v``, a ``/live-video-to-video`` one)."""
    params = _params(body)
    check_params_size(params, limits.max_params_bytes)
    width, height = _output_size(params, limits.max_output_pixels)
    if lv2v:
        candidates = [
            ("stream_id", body.get("stream_id")),
            ("gateway_request_id", body.get("gateway_request_id")),
        ]
        candidates += [("manifest_id", body.get("manifest_id")), ("X-Stream-Id", header_id)]
        named = [(name, value) for name, value in candidates if value]
        stream_id = checked_stream_id(named[0][1], named[0][0]) if named else uuid.uuid4().hex[:16]
    elif header_id:
        stream_id = checked_stream_id(header_id, "X-Stream-Id")
    else:
        stream_id = checked_stream_id(body.get("gateway_request_id"), "gateway_request_id")
    return StreamSpec(
        stream_id=stream_id,
        control_url=_url(body, "control_url", required=not lv2v),
        events_url=_url(body, "events_url", required=not lv2v),
        subscribe_url=_url(body, "subscribe_url", required=lv2v),
        publish_url=_url(body, "publish_url", required=lv2v),
        data_url=None if lv2v else _url(body, "data_url", required=False),
        params=params,
        width=width,
        height=height,
        max_fps=max_fps(params.get("max_fps")),
    )


def params_update(raw: bytes, limits: RequestLimits = _DEFAULT_LIMITS) -> dict[str, Any]:
    """A ``/stream/params`` body: the client's parameters as a flat JSON object, checked by
    :func:`byoc.params.check_update` (the check the control channel's updates get too)."""
    params = json_object(raw)
    check_params_size(params, limits.max_params_bytes)
    return check_update(params)


def stream_id_from_body(raw: bytes) -> str | None:
    """``gateway_request_id`` or ``stream_id`` of a body, if it is a JSON object that has one (checked
    by :func:`checked_stream_id`)."""
    try:
        value = _parse_json(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(value, dict):
        for key in ("gateway_request_id", "stream_id"):
            if isinstance(value.get(key), str) and value[key]:
                return checked_stream_id(value[key], key)
    return None


# --- where channel URLs may point (docs/protocol.md §2.9) ----------------------------

CHANNEL_FIELDS = ("subscribe_url", "publish_url", "control_url", "events_url", "data_url")
_LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


@dataclass(frozen=True, slots=True)
class ChannelPolicy:
    """Which hosts the channel URLs of a start may name.

    The container GETs, POSTs to and DELETEs whatever a start body names, so without a check anyone who
    can call ``/stream/start`` could make it reach cloud metadata addresses, loopback services or the
    container's own API. ``allowed`` (None: any host) is the list of allowed hosts. This container's
    API is always refused: ``own_addresses`` (the advertised address) and ``api_port`` on any of
    ``local_hosts`` or a loopback, unspecified or ``localhost`` address.
    """

    allowed: tuple[HostRule, ...] | None
    api_port: int
    local_hosts: frozenset[str] = frozenset()
    own_addresses: frozenset[tuple[str, int]] = frozenset()

    def check(self, spec: StreamSpec) -> None:
        """InvalidRequest naming the first channel URL of ``spec`` that may not be used."""
        for name in CHANNEL_FIELDS:
            url = getattr(spec, name)
            if url is not None:
                self._check(name, url)

    def exposure_warning(self, listen_host: str, token: bool) -> str | None:
        """Why an operator should narrow the policy: any host is allowed while anyone on the network
        can call the API (it listens beyond loopback and has no token); None when that is not so."""
        if self.allowed is not None or token or _is_loopback(host_key(listen_host)):
            return None
        return (
            f"the API listens on {listen_host or '0.0.0.0'} without --token and channel URLs may name any "
            "host: whoever can reach the API can make this container send requests anywhere; set "
            "--allowed-channel-hosts (or --orchestrator-url, whose host is then the default) or --token"
        )

    def _check(self, name: str, url: str) -> None:
        try:
            host, port = url_address(url)
        except ValueError:
            raise InvalidRequest(name, f"has no usable host and port: {url[:100]!r}") from None
        own = (host, port) in self.own_addresses
        local = host in self.local_hosts or _is_loopback(host, or_unspecified=True)
        if own or (port == self.api_port and local):
            raise InvalidRequest(
                name, f"points at this container's own API ({_shown(host, port)}); channels live elsewhere"
            )
        if self.allowed is not None and not any(rule.allows(host, port) for rule in self.allowed):
            shown = ", ".join(str(rule) for rule in self.allowed)
            raise InvalidRequest(
                name,
                f"names {_shown(host, port)}, which is not an allowed channel host ({shown}; "
                "see --allowed-channel-hosts)",
            )


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str, *, or_unspecified: bool = False) -> bool:
    """A loopback address or ``localhost`` name (with ``or_unspecified``: also ``0.0.0.0`` and ``::``,
    which reach this machine when connected to)."""
    if host in _LOCALHOST_NAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or (or_unspecified and address.is_unspecified)


def _machine_hosts() -> set[str]:
    """This machine's host name and the addresses it resolves to (/etc/hosts in a container)."""
    name = socket.gethostname()
    hosts = {host_key(name)}
    with contextlib.suppress(OSError):  # a name that does not resolve: loopback and the name still count
        hosts.update(host_key(str(info[4][0])) for info in socket.getaddrinfo(name, None))
    return hosts


def channel_policy(
    rules: Sequence[HostRule],
    *,
    orchestrator_url: str | None,
    listen_host: str,
    api_port: int,
    advertised_url: str,
) -> ChannelPolicy:
    """The policy of a container listening on ``listen_host:api_port``: ``rules`` when given (``*``:
    any host), else the host of ``orchestrator_url`` when the container registers, else any host.

    Resolves this machine's host name, which may block: call it off the event loop.
    """
    try:
        allowed: tuple[HostRule, ...] | None = tuple(rules) or (
            (HostRule(url_address(orchestrator_url)[0]),) if orchestrator_url else None
        )
    except ValueError as exc:
        raise ConfigError(f"orchestrator_url has no usable host: {exc}") from None
    own: set[tuple[str, int]] = set()
    with contextlib.suppress(ValueError):  # registration, which uses it, says what is wrong with it
        own.add(url_address(advertised_url))
    if allowed is not None and any(rule.host == "*" for rule in allowed):
        allowed = None
    local = _machine_hosts() | {host_key(listen_host)}
    return ChannelPolicy(allowed, api_port, frozenset(local), frozenset(own))

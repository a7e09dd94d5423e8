"""Parsing and validating what the orchestrator sends to the container.

Bad input always gets a clear :class:`~byoc.errors.InvalidRequest` naming the field, and never
reaches a session. Bodies are parsed as JSON whatever their Content-Type says (``curl -d`` sends
``application/x-www-form-urlencoded``; go-livepeer's stop sends none).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from byoc.errors import InvalidRequest
from byoc.params import check_update, max_fps
from byoc.spec import StreamSpec

__all__ = ["MAX_DIMENSION", "json_object", "params_update", "start_spec", "stream_id_from_body"]

MAX_DIMENSION = 4096
_MAX_ID = 256


def json_object(raw: bytes, what: str = "body") -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        value = json.loads(raw or b"null")
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


def _stream_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(name, "must be a non-empty string")
    if len(value) > _MAX_ID or any(ord(c) < 32 for c in value):
        raise InvalidRequest(name, f"must be at most {_MAX_ID} printable characters")
    return value


def _dimension(params: Mapping[str, Any], name: str) -> int:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
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


def start_spec(body: Mapping[str, Any], *, header_id: str | None, lv2v: bool = False) -> StreamSpec:
    """A StreamSpec from a BYOC ``/stream/start`` body (or, with ``lv2v``, a ``/live-video-to-video`` one)."""
    params = _params(body)
    if ("width" in params) != ("height" in params):
        missing = "height" if "width" in params else "width"
        raise InvalidRequest(f"params.{missing}", "width and height go together")
    width = _dimension(params, "width") if "width" in params else 512
    height = _dimension(params, "height") if "height" in params else 512
    if lv2v:
        candidates = [
            ("stream_id", body.get("stream_id")),
            ("gateway_request_id", body.get("gateway_request_id")),
        ]
        candidates += [("manifest_id", body.get("manifest_id")), ("X-Stream-Id", header_id)]
        named = [(name, value) for name, value in candidates if value]
        stream_id = _stream_id(named[0][1], named[0][0]) if named else uuid.uuid4().hex[:16]
    elif header_id:
        stream_id = _stream_id(header_id, "X-Stream-Id")
    else:
        stream_id = _stream_id(body.get("gateway_request_id"), "gateway_request_id")
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


def params_update(raw: bytes) -> dict[str, Any]:
    """A ``/stream/params`` body: the client's parameters as a flat JSON object, checked by
    :func:`byoc.params.check_update` (the check the control channel's updates get too)."""
    return check_update(json_object(raw))


def stream_id_from_body(raw: bytes) -> str | None:
    """``gateway_request_id`` or ``stream_id`` of a body, if it is a JSON object that has one."""
    try:
        value = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(value, dict):
        for key in ("gateway_request_id", "stream_id"):
            if isinstance(value.get(key), str) and value[key]:
                return str(value[key])
    return None

"""A live runner's heartbeat body, decoded and checked as go-livepeer does (``ai/runner/live_runner.go``).

Go decodes the body into a typed struct, so a value of the wrong JSON type fails the whole request; an
unknown key is ignored and ``null`` leaves a field empty. Then ``normalizeHeartbeat`` checks it:
``runner_url`` an absolute http(s) URL, ``app`` present and trimmed, ``metadata`` valid UTF-8 of at most
1,024 bytes, ``status`` lowercase and trimmed, ``mode`` persistent or single-shot (``single_shot`` is
accepted), ``capacity`` not negative (0 becomes 1). This orchestrator is off-chain, so ``price_info``
is only type-checked, as go-livepeer does off-chain.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["MAX_METADATA_BYTES", "RunnerInfo", "parse_heartbeat"]

MAX_METADATA_BYTES = 1024
_MODES = ("persistent", "single-shot")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_INT64 = 1 << 63
_STRINGS = ("runner_id", "label", "runner_url", "version", "metadata", "status", "mode", "app")


@dataclass(frozen=True)
class RunnerInfo:
    """What a runner's latest heartbeat said about it, normalized."""

    runner_url: str
    app: str
    runner_id: str = ""
    label: str = ""
    proxy: bool = False
    version: str = ""
    metadata: str = ""
    status: str = ""
    mode: str = "persistent"
    capacity: int = 1
    gpu: dict[str, Any] | None = None
    price_info: dict[str, Any] | None = None
    session_ids: tuple[str, ...] = ()


def _type_error(value: object, key: str, go_type: str) -> ValueError:
    kind = (
        "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__
    )
    kind = {"str": "string", "bool": "bool", "dict": "object", "list": "array"}.get(kind, kind)
    return ValueError(f"json: cannot unmarshal {kind} into Go struct field .{key} of type {go_type}")


def _int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -_INT64 <= value < _INT64:
        raise _type_error(value, key, "int")
    return value


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise _type_error(value, key, "string")
    return value


def _gpu(value: object) -> dict[str, Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"id": str(_int(value, "gpu"))}  # a device index; go-livepeer looks the name up locally
    if not isinstance(value, dict):
        raise _type_error(value, "gpu", "runner.LiveRunnerGPU")
    gpu: dict[str, Any] = {}
    for key in ("id", "name"):
        if value.get(key) is not None and _string(value[key], f"gpu.{key}"):
            gpu[key] = value[key]
    if value.get("vram_mb") is not None and _int(value["vram_mb"], "gpu.vram_mb"):
        gpu["vram_mb"] = value["vram_mb"]
    return gpu


def _price_info(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _type_error(value, "price_info", "runner.LiveRunnerPriceInfo")
    price = value.get("price")
    if price is not None and (
        isinstance(price, bool)
        or not isinstance(price, int | float | str)
        or (isinstance(price, str) and not _NUMBER.fullmatch(price))
    ):
        raise ValueError(f"json: invalid number literal, trying to unmarshal {json.dumps(price)} into Number")
    for key in ("currency", "unit"):
        if value.get(key) is not None:
            _string(value[key], f"price_info.{key}")
    return {key: value[key] for key in ("price", "currency", "unit") if value.get(key) is not None}


def _decode(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(
            "json: cannot unmarshal non-object into Go value of type runner.LiveRunnerHeartbeatRequest"
        )
    fields: dict[str, Any] = {}
    for key in _STRINGS:
        if data.get(key) is not None:
            fields[key] = _string(data[key], key)
    if data.get("proxy") is not None:
        if not isinstance(data["proxy"], bool):
            raise _type_error(data["proxy"], "proxy", "bool")
        fields["proxy"] = data["proxy"]
    fields["capacity"] = _int(data["capacity"], "capacity") if data.get("capacity") is not None else 0
    if data.get("gpu") is not None:
        fields["gpu"] = _gpu(data["gpu"])
    if data.get("price_info") is not None:
        fields["price_info"] = _price_info(data["price_info"])
    if data.get("session_ids") is not None:
        ids = data["session_ids"]
        if not isinstance(ids, list):
            raise _type_error(ids, "session_ids", "[]string")
        fields["session_ids"] = tuple(_string(item, "session_ids") for item in ids)
    return fields


def _valid_runner_url(url: str) -> bool:
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return False
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(hostname)


def _check_metadata(metadata: str) -> None:
    try:
        size = len(metadata.encode())
    except UnicodeEncodeError:  # a lone surrogate escape: Go decodes it to U+FFFD
        size = -1
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes")
    if size < 0 or "\ufffd" in metadata:
        raise ValueError("metadata must be valid UTF-8 without the replacement character U+FFFD")


def parse_heartbeat(body: bytes) -> RunnerInfo:
    """The heartbeat body as a :class:`RunnerInfo`; ``ValueError`` says why go-livepeer answers 400."""
    fields = _decode(body)
    if not _valid_runner_url(fields.get("runner_url", "")):
        raise ValueError("invalid runner_url")
    app = fields.get("app", "")
    if not app or app != app.strip():
        raise ValueError("app must be trimmed")
    _check_metadata(fields.get("metadata", ""))
    status = fields.get("status", "")
    if status != status.strip().lower():
        raise ValueError("status must be lowercase and trimmed")
    mode = fields.get("mode") or "persistent"
    mode = "single-shot" if mode == "single_shot" else mode
    if mode not in _MODES:
        raise ValueError('mode must be "persistent" or "single-shot"')
    if fields["capacity"] < 0:
        raise ValueError("capacity must be >= 0")
    fields["runner_id"] = fields.get("runner_id", "").strip()
    return RunnerInfo(**{**fields, "mode": mode, "capacity": fields["capacity"] or 1})

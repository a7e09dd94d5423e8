"""Capability registration as go-livepeer's orchestrator does it (docs/protocol.md §1).

``POST /capability/register``: ``Authorization`` must equal the orchestrator secret byte for byte (no
``Bearer``), else 400 ``invalid authorization``; the JSON body is parsed with Go's strictness (a float
where an integer belongs fails the request); success answers ``ok`` with a JSON content type although
``ok`` is not JSON. ``POST /capability/unregister`` takes the raw capability name as its body and
always answers ``ok``. Re-registering a name replaces the entry (and, as in go-livepeer, its load).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["CAPABILITY_FIELDS", "Capability", "CapabilityRegistry"]

log = logging.getLogger(__name__)

# Field name -> the JSON type Go's encoding/json accepts for it (core.ExternalCapability).
CAPABILITY_FIELDS: dict[str, type] = {
    "name": str,
    "url": str,
    "capacity": int,
    "price_per_unit": int,
    "price_scaling": int,
    "currency": str,
    "description": str,
    "token": str,
}


@dataclass
class Capability:
    name: str
    url: str
    capacity: int
    price_per_unit: int = 0
    price_scaling: int = 1
    currency: str = ""
    description: str = ""
    token: str = ""
    load: int = 0

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.load)

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "capacity": self.capacity, "load": self.load}


def _parse(body: bytes) -> Capability:
    """Parse a registration like Go's json.Unmarshal into core.ExternalCapability (unknown keys ignored)."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"invalid character in JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"json: cannot unmarshal {type(data).__name__} into Go value of type core.ExternalCapability"
        )
    values: dict[str, Any] = {}
    for key, kind in CAPABILITY_FIELDS.items():
        if key not in data or data[key] is None:
            continue
        value = data[key]
        valid = isinstance(value, kind) and not isinstance(value, bool)
        if kind is int and isinstance(value, float) and value.is_integer() and "." not in json.dumps(value):
            valid = True
        if not valid:
            raise ValueError(f"json: cannot unmarshal {type(value).__name__} into Go struct field .{key}")
        values[key] = value
    values.setdefault("name", "")
    values.setdefault("url", "")
    values.setdefault("capacity", 0)
    if values.get("price_scaling", 0) == 0:
        values["price_scaling"] = 1  # go-livepeer silently replaces 0
    return Capability(**values)


class CapabilityRegistry:
    """The capabilities containers registered (or that were configured up front)."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self.capabilities: dict[str, Capability] = {}
        self.unregistered: list[str] = []

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/capability/register", self._register)
        app.router.add_post("/capability/unregister", self._unregister)

    def add(self, capability: Capability) -> None:
        self.capabilities[capability.name] = capability

    def pick(self, name: str) -> Capability | None:
        """The capability ``name`` if it has free capacity."""
        capability = self.capabilities.get(name)
        return capability if capability is not None and capability.free > 0 else None

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "") == self._secret

    async def _register(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=400, text="invalid authorization")
        try:
            body = await request.read()
        except Exception:
            return web.Response(status=400, text="Error reading request body")
        try:
            capability = _parse(body)
        except ValueError as exc:
            return web.Response(status=400, text=f"Error registering capability: {exc}")
        self.capabilities[capability.name] = capability
        log.info(
            "registered capability %s at %s (capacity %d)",
            capability.name,
            capability.url,
            capability.capacity,
        )
        return web.Response(text="ok", content_type="application/json")

    async def _unregister(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=400, text="invalid authorization")
        name = (await request.read()).decode(errors="replace")
        self.capabilities.pop(name, None)
        self.unregistered.append(name)
        log.info("unregistered capability %s", name)
        return web.Response(text="ok", content_type="application/json")

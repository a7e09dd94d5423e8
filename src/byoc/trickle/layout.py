"""The trickle channels of one stream, as go-livepeer's orchestrator names, types and hands them out.

For a stream ``NAME`` the orchestrator creates (docs/protocol.md §2.2):

======= ================ ====================== ================= =================
role    channel          MIME type              container's field gateway's field
======= ================ ====================== ================= =================
input   ``NAME``         ``video/MP2T``         ``subscribe_url`` ``publish_url``
output  ``NAME-out``     ``video/MP2T``         ``publish_url``   ``subscribe_url``
control ``NAME-control`` ``application/json``   ``control_url``   ``control_url``
events  ``NAME-events``  ``application/json``   ``events_url``    ``events_url``
data    ``NAME-data``    ``application/jsonl``  ``data_url``      ``data_url``
======= ================ ====================== ================= =================

The data channel exists only when the stream asked for data output. The container's fields are the
channel URLs of the ``/stream/start`` body; the gateway's are the same URLs seen from the other end
(the orchestrator returns them as ``X-Publish-Url``, ``X-Subscribe-Url``, ...): the gateway publishes
the input and subscribes to the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from byoc.trickle.protocol import channel_url

__all__ = ["ROLES", "Role", "StreamChannels", "role_of_field"]

Role = Literal["input", "output", "control", "events", "data"]


@dataclass(frozen=True, slots=True)
class _RoleLayout:
    suffix: str
    mime_type: str
    container_field: str
    gateway_field: str


_LAYOUT: Final[dict[Role, _RoleLayout]] = {
    "input": _RoleLayout("", "video/MP2T", "subscribe_url", "publish_url"),
    "output": _RoleLayout("-out", "video/MP2T", "publish_url", "subscribe_url"),
    "control": _RoleLayout("-control", "application/json", "control_url", "control_url"),
    "events": _RoleLayout("-events", "application/json", "events_url", "events_url"),
    "data": _RoleLayout("-data", "application/jsonl", "data_url", "data_url"),
}

ROLES: Final[tuple[Role, ...]] = tuple(_LAYOUT)
"""Every role, in the order above."""


def role_of_field(field: str) -> Role:
    """The role whose URL the container's start body carries under ``field`` (``"publish_url"`` -> output)."""
    for role, layout in _LAYOUT.items():
        if layout.container_field == field:
            return role
    raise KeyError(f"no channel is given to the container as {field!r}")


@dataclass(frozen=True, slots=True)
class StreamChannels:
    """The channels of the stream ``stream``; ``data`` when it has a data channel."""

    stream: str
    data: bool = False

    @property
    def roles(self) -> tuple[Role, ...]:
        """The roles this stream has channels for."""
        return tuple(role for role in ROLES if self.data or role != "data")

    def name(self, role: Role) -> str:
        """The channel's name on the trickle server (``NAME-out`` for the output)."""
        self._check(role)
        return self.stream + _LAYOUT[role].suffix

    def names(self) -> dict[Role, str]:
        return {role: self.name(role) for role in self.roles}

    @staticmethod
    def mime_type(role: Role) -> str:
        """The MIME type the orchestrator creates the channel with."""
        return _LAYOUT[role].mime_type

    def url(self, base_url: str, role: Role) -> str:
        """The channel's URL under a trickle base such as ``http://host:8935/ai/trickle/``."""
        return channel_url(base_url, self.name(role))

    def urls(self, base_url: str) -> dict[Role, str]:
        return {role: self.url(base_url, role) for role in self.roles}

    def container_urls(self, base_url: str) -> dict[str, str]:
        """The channel URLs of the container's ``/stream/start`` body (``subscribe_url`` is the input)."""
        return {_LAYOUT[role].container_field: self.url(base_url, role) for role in self.roles}

    def gateway_urls(self, base_url: str) -> dict[str, str]:
        """The same URLs from the gateway's side (``publish_url`` is the input)."""
        return {_LAYOUT[role].gateway_field: self.url(base_url, role) for role in self.roles}

    def start_body(self, base_url: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The body go-livepeer's orchestrator posts to the container's ``/stream/start``."""
        return {"gateway_request_id": self.stream, **self.container_urls(base_url), "params": params}

    def _check(self, role: Role) -> None:
        if role not in self.roles:
            raise KeyError(f"stream {self.stream!r} has no {role} channel")

"""The trickle protocol: client (subscriber, publisher, JSON channels) and a go-livepeer-faithful server."""

from __future__ import annotations

from byoc.trickle.channels import ControlReader, DataWriter, EventsWriter
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.protocol import RetryPolicy
from byoc.trickle.publisher import PublishSegment, TricklePublisher
from byoc.trickle.subscriber import SubscribedSegment, TrickleSubscriber

__all__ = [
    "ControlReader",
    "DataWriter",
    "EventsWriter",
    "PublishSegment",
    "RetryPolicy",
    "SubscribedSegment",
    "TrickleClientSettings",
    "TricklePublisher",
    "TrickleSubscriber",
    "create_client_session",
]

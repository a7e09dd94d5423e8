"""The trickle protocol, client side: subscriber, publisher (asyncio, and blocking for threads), JSON
channels (the test server: byoc.dev)."""

from __future__ import annotations

from byoc.trickle.blocking import BlockingPublisher, BlockingSubscriber
from byoc.trickle.channels import ControlReader, DataWriter, EventsWriter
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.layout import StreamChannels
from byoc.trickle.protocol import RetryPolicy
from byoc.trickle.publisher import PublishSegment, TricklePublisher
from byoc.trickle.subscriber import SubscribedSegment, TrickleSubscriber

__all__ = [
    "BlockingPublisher",
    "BlockingSubscriber",
    "ControlReader",
    "DataWriter",
    "EventsWriter",
    "PublishSegment",
    "RetryPolicy",
    "StreamChannels",
    "SubscribedSegment",
    "TrickleClientSettings",
    "TricklePublisher",
    "TrickleSubscriber",
    "create_client_session",
]

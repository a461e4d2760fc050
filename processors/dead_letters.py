"""Dead letters: messages a stream processor gives up on go to ``dicom.deadletter``, and the partition moves on.

A message that breaks its topic's schema, or whose processing fails for a reason retrying cannot fix
(the data, not the infrastructure), would otherwise be retried forever and stall every message behind
it. It is published verbatim with where it came from and why, and logged without its contents.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from cassandra import CoordinationFailure, OperationTimedOut, Timeout, Unavailable
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionException

from dicomgrid import schemas
from dicomgrid.core.events import dead_letter
from dicomgrid.core.kafka import EventPublisher
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

# Failures of the infrastructure, not of the message: the processor holds its offsets and retries.
TRANSIENT = (NoHostAvailable, OperationTimedOut, Unavailable, Timeout, CoordinationFailure, ConnectionException,
             OSError)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


class Rejected(ValueError):
    """A message that cannot be processed as it stands."""


def decode(value: bytes | str | None, topic: str) -> dict[str, Any]:
    """A message value as the event its topic's schema describes; :class:`Rejected` otherwise."""
    try:
        event = json.loads(value) if value is not None else None
    except (TypeError, ValueError) as exc:
        raise Rejected(f"not JSON: {type(exc).__name__}") from None
    try:
        schemas.validate_event(topic, event)
    except schemas.InvalidEvent as exc:
        raise Rejected(str(exc)) from None
    return event


class DeadLetters:
    """Publishes the dead letters of one processor (its name goes into every record)."""

    def __init__(self, publisher: EventPublisher, processor: str) -> None:
        self._publisher = publisher
        self.processor = processor

    async def send(self, message: Any, reason: str) -> None:
        """Dead-letter a faust message; returns once the brokers have it (retrying while they do not)."""
        record = dead_letter(self.processor, message.topic, message.partition, message.offset,
                             _as_bytes(message.key), _as_bytes(message.value), reason)
        log.error("message dead-lettered", processor=self.processor, topic=message.topic,
                  partition=message.partition, offset=message.offset, reason=reason)
        key = record["key"] or ""
        while True:
            try:
                await asyncio.wrap_future(self._publisher.publish(schemas.TOPIC_DEADLETTER, key, record))
                return
            except Exception as exc:  # Kafka unavailable: the message must not be skipped unrecorded
                log.warning("dead letter not delivered; retrying", processor=self.processor, error=str(exc))
                await asyncio.sleep(2.0)


def _as_bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()

"""Reading a bench grid's event topics from the outside, without joining any consumer group.

The replication sections watch ``dicom.replication.requested`` (has the fan-out asked for every copy
yet?) and ``dicom.replica.stored`` (has every copy been made?) this way: a consumer assigned to every
partition from the end offsets it found when it was made, so it sees only what happens after. Reading
the log costs the grid nothing, unlike polling its tables.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from dicomgrid.core.config import GridConfig
from dicomgrid.core.kafka import kafka_retry

LOOKUP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Seen:
    event: dict[str, Any]
    appended_at: float  # the message's Kafka timestamp (time.time() seconds): when its producer made it


class Tap:
    """Every event of one of the grid's topics (logical name) published after the tap was made."""

    def __init__(self, config: GridConfig, logical: str) -> None:
        self.topic = config.kafka.topic(logical)
        self.seen: list[Seen] = []
        self._consumer = Consumer({**config.kafka.client_config(), "group.id": f"bench-tap-{uuid.uuid4()}",
                                   "enable.auto.commit": False, "log_level": 3})
        try:
            metadata = kafka_retry(LOOKUP_TIMEOUT_S)(self._consumer.list_topics, self.topic, timeout=10)
            partitions = sorted(metadata.topics[self.topic].partitions)
            starts = []
            for p in partitions:
                _, high = kafka_retry(LOOKUP_TIMEOUT_S)(
                    self._consumer.get_watermark_offsets, TopicPartition(self.topic, p), timeout=10)
                starts.append(TopicPartition(self.topic, p, high))
            self._consumer.assign(starts)
        except BaseException:
            self._consumer.close()
            raise

    def read(self, timeout: float = 0.2) -> int:
        """Read what has arrived (waiting up to ``timeout`` for the first message); how many were new."""
        batch = self._consumer.consume(1000, timeout=timeout)
        new = 0
        for msg in batch:
            if msg.error() is not None:
                continue
            try:
                event = json.loads(msg.value())
            except (TypeError, ValueError):
                continue
            self.seen.append(Seen(event, msg.timestamp()[1] / 1000))
            new += 1
        return new

    def until(self, done: Callable[[list[Seen]], bool], timeout: float) -> bool:
        """Read until ``done(seen)`` holds; False if ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while not done(self.seen):
            if time.monotonic() > deadline:
                return False
            self.read()
        return True

    def close(self) -> None:
        self._consumer.close()

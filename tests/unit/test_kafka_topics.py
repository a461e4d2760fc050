"""Processes name topics by their logical name; the Kafka clients use the grid's physical topics."""

from typing import Any

import pytest

from dicomgrid import schemas
from dicomgrid.core import kafka
from dicomgrid.core.config import KafkaConfig


class RecordingProducer:
    def __init__(self, conf: dict[str, Any]) -> None:
        self.topics: list[str] = []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Any) -> None:
        self.topics.append(topic)

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0

    def purge(self) -> None:
        pass

    def close(self) -> bool:
        return True


@pytest.mark.parametrize("prefix", ["", "grid-7."])
def test_publisher_takes_logical_names_and_writes_the_grids_topics(monkeypatch: pytest.MonkeyPatch, prefix: str):
    monkeypatch.setattr(kafka, "Producer", RecordingProducer)
    publisher = kafka.EventPublisher(KafkaConfig(topic_prefix=prefix))
    try:
        publisher.publish(schemas.TOPIC_INSTANCE_STORED, "1.2.3", {})
        publisher.publish(schemas.TOPIC_AUDIT, "A", {})
        assert publisher._producer.topics == [f"{prefix}dicom.instance.stored", f"{prefix}dicom.audit"]
    finally:
        publisher.close()


def test_every_contract_topic_stays_a_legal_kafka_name_under_the_longest_prefix():
    config = KafkaConfig(topic_prefix="p" * 200)
    for name in schemas.topics():
        assert len(config.topic(name)) <= 249


def test_unprefixed_topics_are_never_deleted():
    with pytest.raises(ValueError, match="unprefixed"):
        kafka.delete_topics(KafkaConfig())

"""Processes name topics by their logical name; the Kafka clients use the grid's physical topics."""

from typing import Any

import pytest

from dicomgrid import schemas
from dicomgrid.core import kafka
from dicomgrid.core.audit import audit_record
from dicomgrid.core.config import KafkaConfig
from dicomgrid.core.events import dead_letter


class RecordingProducer:
    def __init__(self, conf: dict[str, Any]) -> None:
        self.topics: list[str] = []
        self.headers: list[Any] = []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Any, headers: Any = None) -> None:
        self.topics.append(topic)
        self.headers.append(headers)

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
        publisher.publish(schemas.TOPIC_DEADLETTER, "1.2.3", dead_letter("indexer", "t", 0, 7, None, b"{}", "test"))
        publisher.publish(schemas.TOPIC_AUDIT, "A", audit_record("A", "E", "Application Activity", 0, "test", [], []))
        assert publisher._producer.topics == [f"{prefix}dicom.deadletter", f"{prefix}dicom.audit"]
        assert publisher._producer.headers[1] == [("event_type", b"dicom.audit"), ("schema_version", b"1")]
    finally:
        publisher.close()


def test_an_event_that_breaks_its_schema_is_refused_unsent_and_unquoted(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(kafka, "Producer", RecordingProducer)
    publisher = kafka.EventPublisher(KafkaConfig())
    record = audit_record("A", "E", "Application Activity", 0, "test", [], [])
    record["outcome_description"] = "Doe^Jane " * 300  # longer than the schema allows
    try:
        with pytest.raises(schemas.InvalidEvent) as refused:
            publisher.publish(schemas.TOPIC_AUDIT, "A", record)
        assert "outcome_description" in str(refused.value) and "Doe" not in str(refused.value)
        with pytest.raises(schemas.InvalidEvent, match="required"):
            publisher.publish(schemas.TOPIC_AUDIT, "A", {})
        assert publisher._producer.topics == []
    finally:
        publisher.close()


def test_every_contract_topic_stays_a_legal_kafka_name_under_the_longest_prefix():
    config = KafkaConfig(topic_prefix="p" * 200)
    for name in schemas.topics():
        assert len(config.topic(name)) <= 249


def test_unprefixed_topics_are_never_deleted():
    with pytest.raises(ValueError, match="unprefixed"):
        kafka.delete_topics(KafkaConfig())


def test_events_holding_str_subclasses_are_validated_as_serialized():
    from pydicom.uid import UID

    record = dead_letter("indexer", "t", 0, 7, None, b"{}", "test")
    record["key"] = UID("1.2.3")
    schemas.validate_event(schemas.TOPIC_DEADLETTER, record)
    record["offset"] = UID("1.2.3")
    with pytest.raises(schemas.InvalidEvent, match="offset"):
        schemas.validate_event(schemas.TOPIC_DEADLETTER, record)

"""Topic readiness and retries on the Kafka errors of partitions that are not serving yet, against fakes
of the admin client (the real broker's behaviour is covered by tests/integration/test_topic_readiness.py)."""

from __future__ import annotations

import gc
import weakref
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from dicomgrid import schemas
from dicomgrid.core import kafka
from dicomgrid.core.config import KafkaConfig


def kafka_error(code: int) -> KafkaException:
    return KafkaException(KafkaError(code))


class FakeAdmin:
    """Answers metadata from ``partitions`` (topic -> count) and ListOffsets per partition from
    ``answers``: a list of error codes to answer first, in order, then the offset 0."""

    def __init__(self, partitions: dict[str, int], answers: dict[tuple[str, int], list[int]] | None = None,
                 hidden_rounds: dict[str, int] | None = None) -> None:
        self.partitions = partitions
        self.answers = {k: list(v) for k, v in (answers or {}).items()}
        self.hidden_rounds = dict(hidden_rounds or {})  # topic -> metadata rounds it is missing from
        self.asked: list[tuple[str, int]] = []
        self.metadata_rounds = 0

    def list_topics(self, timeout: float) -> SimpleNamespace:
        self.metadata_rounds += 1
        topics = {}
        for topic, count in self.partitions.items():
            if self.hidden_rounds.get(topic, 0) > 0:
                self.hidden_rounds[topic] -= 1
                continue
            topics[topic] = SimpleNamespace(error=None, partitions={p: SimpleNamespace(leader=1) for p in range(count)})
        return SimpleNamespace(topics=topics)

    def list_offsets(self, requests: dict[TopicPartition, Any], request_timeout: float) -> dict[TopicPartition, Future]:
        futures = {}
        for tp in requests:
            key = (tp.topic, tp.partition)
            self.asked.append(key)
            future: Future = Future()
            pending = self.answers.get(key)
            if pending:
                future.set_exception(kafka_error(pending.pop(0)))
            else:
                future.set_result(SimpleNamespace(offset=0))
            futures[tp] = future
        return futures


def test_waits_until_every_partition_answers_a_list_offsets_request():
    admin = FakeAdmin(
        {"t1": 2, "t2": 1},
        answers={
            ("t1", 1): [KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.NOT_LEADER_FOR_PARTITION],
            ("t2", 0): [KafkaError.LEADER_NOT_AVAILABLE],
        },
    )
    kafka.wait_until_serving(admin, ["t1", "t2"], timeout=30)
    # Answered by the leader, each partition that was not serving was asked again until it was.
    assert admin.asked.count(("t1", 1)) == 3
    assert admin.asked.count(("t2", 0)) >= 2
    assert all(not pending for pending in admin.answers.values())


def test_a_topic_missing_from_the_metadata_is_waited_for():
    admin = FakeAdmin({"t1": 1}, hidden_rounds={"t1": 2})
    kafka.wait_until_serving(admin, ["t1"], timeout=30)
    assert admin.metadata_rounds == 3
    assert admin.asked == [("t1", 0)]


def test_a_partition_that_never_answers_fails_with_its_name():
    admin = FakeAdmin({"t1": 3}, answers={("t1", 2): [KafkaError.NOT_LEADER_FOR_PARTITION] * 10_000})
    with pytest.raises(kafka.TopicsNotServing, match=r"t1\[2\] \(NOT_LEADER_FOR_PARTITION\)") as failure:
        kafka.wait_until_serving(admin, ["t1"], timeout=0.3)
    assert "t1[0]" not in str(failure.value) and "t1[1]" not in str(failure.value)
    assert isinstance(failure.value, TimeoutError)


def test_an_error_that_waiting_cannot_cure_is_raised_at_once():
    admin = FakeAdmin({"t1": 1}, answers={("t1", 0): [KafkaError.TOPIC_AUTHORIZATION_FAILED]})
    with pytest.raises(KafkaException) as failure:
        kafka.wait_until_serving(admin, ["t1"], timeout=30)
    assert failure.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert admin.asked == [("t1", 0)]


def test_ensure_topics_waits_for_every_topic_of_the_contract_even_when_it_creates_none(monkeypatch):
    config = KafkaConfig(topic_prefix="grid-9.", partitions=2)
    names = [config.topic(name) for name in schemas.topics()]
    admin = FakeAdmin({name: 2 for name in names}, answers={(names[-1], 1): [KafkaError.NOT_LEADER_FOR_PARTITION]})
    admin.create_topics = lambda *args, **kwargs: pytest.fail("every topic exists; none is created")
    monkeypatch.setattr(kafka, "AdminClient", lambda conf: admin)
    assert kafka.ensure_topics(config) == []
    assert set(admin.asked) == {(name, p) for name in names for p in range(2)}
    assert admin.asked.count((names[-1], 1)) == 2


@pytest.mark.parametrize(
    "code",
    [KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART,
     KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT, KafkaError._TRANSPORT],
)
def test_kafka_retry_gets_past_the_errors_of_a_partition_not_serving_yet(code: int):
    calls = []

    def watermarks(partition: str, timeout: float) -> tuple[int, int]:
        calls.append(partition)
        if len(calls) < 3:
            raise kafka_error(code)
        return 0, 42

    assert kafka.kafka_retry(30)(watermarks, "t1[0]", timeout=5) == (0, 42)
    assert calls == ["t1[0]"] * 3


def test_kafka_retry_raises_other_errors_at_once_and_the_last_error_when_time_is_up():
    calls = []

    def denied() -> None:
        calls.append(1)
        raise kafka_error(KafkaError.TOPIC_AUTHORIZATION_FAILED)

    with pytest.raises(KafkaException):
        kafka.kafka_retry(30)(denied)
    assert len(calls) == 1

    def not_leader() -> None:
        raise kafka_error(KafkaError.NOT_LEADER_FOR_PARTITION)

    with pytest.raises(KafkaException) as failure:
        kafka.kafka_retry(0.2)(not_leader)
    assert failure.value.args[0].code() == KafkaError.NOT_LEADER_FOR_PARTITION


def test_only_kafka_errors_are_retriable():
    assert kafka.is_retriable(kafka_error(KafkaError.NOT_LEADER_FOR_PARTITION))
    assert not kafka.is_retriable(kafka_error(KafkaError.INVALID_REPLICATION_FACTOR))
    assert not kafka.is_retriable(ValueError("not Kafka"))
    assert not kafka.is_retriable(KafkaException("no KafkaError inside"))


class UndeliveringProducer:
    """Queues every event and delivers none (a broker that is gone); purge() fails them."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.queued: list[Any] = []
        self.purged: list[Any] = []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Any, headers: Any = None) -> None:
        self.queued.append(on_delivery)

    def poll(self, timeout: float) -> int:
        served, self.purged = self.purged, []
        for on_delivery in served:
            on_delivery(KafkaError(KafkaError._PURGE_QUEUE), None)
        return len(served)

    def flush(self, timeout: float) -> int:
        return len(self.queued)

    def purge(self) -> None:
        self.purged, self.queued = self.queued, []

    def close(self) -> bool:
        self.closed = True
        return True


def _audit() -> dict:
    from dicomgrid.core.audit import audit_record

    return audit_record("A", "E", "Application Activity", 0, "test", [], [])


def test_a_closed_publisher_releases_its_client_and_fails_what_was_not_delivered(monkeypatch):
    monkeypatch.setattr(kafka, "Producer", UndeliveringProducer)
    publisher = kafka.EventPublisher(KafkaConfig(topic_prefix="grid-9."))
    producer = publisher._producer
    client = weakref.ref(producer)
    pending = publisher.publish(schemas.TOPIC_AUDIT, "A", _audit())
    publisher.close(timeout=0)
    assert producer.closed, "the producer's client is not destroyed by close()"
    del producer
    gc.collect()
    assert client() is None, "the publisher keeps its closed producer"
    with pytest.raises(kafka.PublishError, match="Purged"):
        pending.result(timeout=0)
    with pytest.raises(kafka.PublishError, match="closed"):
        publisher.publish(schemas.TOPIC_AUDIT, "A", _audit()).result(timeout=0)
    publisher.close()  # a second close is harmless

"""testcontainers' Kafka, for machines with a Docker engine; skipped cleanly elsewhere."""

from __future__ import annotations

import time
import uuid

import pytest

pytestmark = pytest.mark.docker


def _docker_answers() -> bool:
    """Whether a Docker engine answers a ping (fails fast when there is no socket)."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (DockerException, OSError):
        return False


def test_testcontainers_kafka_round_trip(kafka_clients):
    if not _docker_answers():
        pytest.skip("no Docker engine")
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer() as kafka:
        conf = {"bootstrap.servers": kafka.get_bootstrap_server()}
        topic = f"tc-{uuid.uuid4().hex[:8]}"
        AdminClient(conf).create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
        producer = kafka_clients(Producer({**conf, "acks": "all", "enable.idempotence": True}))
        producer.produce(topic, value=b"hello")
        assert producer.flush(30) == 0
        consumer = kafka_clients(Consumer({**conf, "group.id": topic, "auto.offset.reset": "earliest"}))
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        msg = None
        while msg is None and time.monotonic() < deadline:
            candidate = consumer.poll(1.0)
            if candidate is not None and candidate.error() is None:
                msg = candidate
        consumer.close()
        assert msg is not None and msg.value() == b"hello"

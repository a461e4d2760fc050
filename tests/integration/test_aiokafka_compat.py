"""aiokafka (the client faust-streaming runs on) works against the local broker, consumer groups
and offset commits included: Kafka 4 dropped old protocol versions (KIP-896)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from dicomgrid.core.config import GridConfig
from dicomgrid.core.kafka import wait_until_serving

pytestmark = pytest.mark.cluster

PARTITIONS = 2


@pytest.fixture
def topic(cluster: GridConfig) -> Iterator[str]:
    admin = AdminClient(cluster.kafka.client_config())
    name = f"aiokafka-{uuid.uuid4().hex[:12]}"
    admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])[name].result(30)
    wait_until_serving(admin, [name])
    yield name
    admin.delete_topics([name])[name].result(30)


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=value)
    finally:
        await producer.stop()


async def _consume_and_commit(bootstrap: str, topic: str, group: str, expected: int) -> list[bytes]:
    """Join ``group``, read up to ``expected`` messages (waiting at most 20 s), commit, leave."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group,
        auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await consumer.start()
    try:
        values: list[bytes] = []
        async with asyncio.timeout(20):
            while len(values) < expected:
                batches = await consumer.getmany(timeout_ms=500)
                values += [msg.value for batch in batches.values() for msg in batch]
        await consumer.commit()
        return values
    finally:
        await consumer.stop()


async def _committed(bootstrap: str, topic: str, group: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = [await consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)]
        return sum(o or 0 for o in offsets)
    finally:
        await consumer.stop()


def test_aiokafka_group_commit_round_trip(cluster: GridConfig, topic: str):
    bootstrap = cluster.kafka.bootstrap_servers
    group = f"group-{topic}"
    first = [f"first-{i}".encode() for i in range(10)]

    async def scenario() -> None:
        await _produce(bootstrap, topic, first)
        assert sorted(await _consume_and_commit(bootstrap, topic, group, len(first))) == sorted(first)
        assert await _committed(bootstrap, topic, group) == len(first)
        # A new member of the group resumes after the committed offsets: only the new message.
        await _produce(bootstrap, topic, [b"second"])
        assert await _consume_and_commit(bootstrap, topic, group, 1) == [b"second"]

    asyncio.run(scenario())

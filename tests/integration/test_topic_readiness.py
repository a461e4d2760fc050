"""Topics are usable the moment ``ensure_topics`` (``dicomgrid schema apply``) returns.

On KRaft a partition's leader named by the metadata can still answer NOT_LEADER_FOR_PARTITION for a
while after CreateTopics; here every partition is read at once by a plain consumer, without retrying.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from dicomgrid import schemas
from dicomgrid.core.config import GridConfig
from dicomgrid.core.kafka import delete_topics, ensure_topics

pytestmark = [pytest.mark.cluster]

ROUNDS = 5


def read_every_partition(consumer: Consumer, wanted: dict[str, int]) -> None:
    """Every partition's watermarks, once each: raises KafkaException (NOT_LEADER_FOR_PARTITION, ...)
    for a partition that is not serving."""
    metadata = consumer.list_topics(timeout=10).topics
    for topic, count in sorted(wanted.items()):
        assert len(metadata[topic].partitions) == count
        for p in metadata[topic].partitions:
            assert consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) == (0, 0)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_every_partition_answers_as_soon_as_ensure_topics_returns(cluster: GridConfig, kafka_clients, round_: int):
    config = cluster.kafka.model_copy(update={"topic_prefix": f"readiness-{uuid.uuid4().hex[:12]}."})
    wanted = {config.topic(name): spec.partitions or config.partitions for name, spec in schemas.topics().items()}
    # Connected before the topics exist, so nothing delays the reads after ensure_topics returns.
    consumer = kafka_clients(Consumer({**config.client_config(), "group.id": f"readiness-{uuid.uuid4()}"}))
    consumer.list_topics(timeout=10)
    try:
        assert set(ensure_topics(config)) == set(wanted)
        read_every_partition(consumer, wanted)
    finally:
        delete_topics(config)


def test_every_partition_answers_as_soon_as_schema_apply_returns(cluster: GridConfig, kafka_clients):
    prefix = f"readiness-{uuid.uuid4().hex[:12]}."
    config = cluster.kafka.model_copy(update={"topic_prefix": prefix})
    wanted = {config.topic(name): spec.partitions or config.partitions for name, spec in schemas.topics().items()}
    consumer = kafka_clients(Consumer({**config.client_config(), "group.id": f"readiness-{uuid.uuid4()}"}))
    consumer.list_topics(timeout=10)
    env = {**os.environ, "DICOMGRID_KAFKA__TOPIC_PREFIX": prefix, "DICOMGRID_CASSANDRA__KEYSPACE": "dicomgrid_test"}
    try:
        done = subprocess.run([sys.executable, "-m", "dicomgrid", "schema", "apply"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"kafka: {len(wanted)} topic(s) created" in done.stdout
        read_every_partition(consumer, wanted)
    finally:
        delete_topics(config)

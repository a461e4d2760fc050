"""Topics are usable the moment ``ensure_topics`` (``dicomgrid schema apply``) returns.

On KRaft a partition's leader named by the metadata can still answer NOT_LEADER_FOR_PARTITION for a
while after CreateTopics; here every partition is read at once by a plain consumer, without retrying.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from dicomgrid import schemas
from dicomgrid.core.config import GridConfig
from dicomgrid.core.kafka import delete_topics, ensure_topics

pytestmark = [pytest.mark.cluster]

ROUNDS = 5


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_every_partition_answers_as_soon_as_ensure_topics_returns(cluster: GridConfig, round_: int):
    config = cluster.kafka.model_copy(update={"topic_prefix": f"readiness-{uuid.uuid4().hex[:12]}."})
    wanted = {config.topic(name): spec.partitions or config.partitions for name, spec in schemas.topics().items()}
    # Connected before the topics exist, so nothing delays the reads after ensure_topics returns.
    consumer = Consumer({**config.client_config(), "group.id": f"readiness-{uuid.uuid4()}", "log_level": 0})
    try:
        consumer.list_topics(timeout=10)
        assert set(ensure_topics(config)) == set(wanted)
        metadata = consumer.list_topics(timeout=10).topics
        for topic, count in sorted(wanted.items()):
            assert len(metadata[topic].partitions) == count
            for p in metadata[topic].partitions:
                # Raises KafkaException (NOT_LEADER_FOR_PARTITION, ...) if the partition is not serving.
                assert consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) == (0, 0)
    finally:
        consumer.close()
        delete_topics(config)

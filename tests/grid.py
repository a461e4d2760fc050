"""A grid under test: its own sites, ports, keyspace and consumer group, on the shared local cluster.

The test grid never touches a development grid started with ``make run``: it has its own Kafka topics
(``kafka.topic_prefix`` derived from its name), so it sees only the events it produces itself.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from dicomgrid.core.config import GridConfig, load_config
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.index_reader import IndexReader

TEST_GRID_PREFIX = "dicomgrid-test-"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_test_config(path: Path, name: str, data_dir: Path, storage: Path) -> Path:
    """A two-site grid config for tests on free ports, sharing the cluster under ``data_dir``, with its
    own topics (prefix ``<name>.``)."""
    sites = []
    for site, dc, peer in (("A", "dc1", "B"), ("B", "dc2", "A")):
        dicom_port, http_port = free_port(), free_port()
        sites.append(
            f'[[sites]]\nname = "{site}"\nae_title = "GRID_{site}"\ndicom_port = {dicom_port}\n'
            f'http_port = {http_port}\nstorage_root = "{storage / site}"\ncassandra_dc = "{dc}"\n'
            f'replicate_to = ["{peer}"]\n'
        )
    path.write_text(
        f'name = "{name}"\ndata_dir = "{data_dir}"\nlog_level = "INFO"\n'
        f'[cassandra]\nkeyspace = "dicomgrid_test"\n'
        f'[kafka]\ndelivery_timeout_s = 6.0\ntopic_prefix = "{name}."\n'
        + "\n".join(sites)
    )
    return path


@dataclass
class EventTap:
    """Reads a topic (logical name, e.g. ``schemas.TOPIC_AUDIT``) of the grid from the offsets it had when
    the tap was made."""

    config: GridConfig
    topic: str
    _consumer: Consumer = field(init=False)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._consumer = Consumer(
            {
                **self.config.kafka.client_config(),
                "group.id": f"test-tap-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        topic = self.config.kafka.topic(self.topic)
        meta = self._consumer.list_topics(topic, timeout=10)
        partitions = []
        for p in meta.topics[topic].partitions:
            _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            partitions.append(TopicPartition(topic, p, high))
        self._consumer.assign(partitions)

    def collect(self, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until ``until(seen)`` holds (or the timeout passes); returns everything seen."""
        deadline = time.monotonic() + timeout
        while not until(self.seen) and time.monotonic() < deadline:
            for msg in self._consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    self.seen.append(json.loads(msg.value()))
        return self.seen

    def drain(self, seconds: float = 2.0) -> list[dict[str, Any]]:
        return self.collect(lambda _: False, timeout=seconds)

    def close(self) -> None:
        self._consumer.close()


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.3) -> Any:
    """Retry ``check`` until it returns a truthy value; return it or fail with the last one."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout}s"
            return value
        time.sleep(interval)


def index_reader(config: GridConfig, dc: str) -> IndexReader:
    """The index as a site in datacenter ``dc`` reads it; close it with ``reader.db.close()``."""
    return IndexReader(Cassandra(config, local_dc=dc))


def load_test_config(path: Path) -> GridConfig:
    return load_config(path)

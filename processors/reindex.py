"""`dicomgrid reindex`: rebuild the index and the replica ledger from the event log.

``dicom.instance.stored`` and ``dicom.replica.stored`` are kept forever (the grid's write-ahead log), so a
keyspace lost with a Cassandra datacenter that cannot repair from its peers is rebuilt by replaying
them: the schema is applied, every instance event goes through the indexer (idempotent upserts with
receive-time timestamps, so the newest version wins whatever the order), and every copy announced is
recorded in the ledger. The replay reads each partition from its start to where it ended when the
replay began; nothing joins any consumer group, so the running processors are not disturbed.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from confluent_kafka import Consumer, TopicPartition

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobRef
from dicomgrid.core.cassandra import Cassandra, apply_schema
from dicomgrid.core.config import GridConfig
from dicomgrid.core.index_writer import IndexWriter
from dicomgrid.core.ledger import replica_write
from dicomgrid.core.logging import get_logger
from dicomgrid.processors.indexer import Indexer

log = get_logger(__name__)

BATCH = 500


@dataclass
class ReindexReport:
    instances: int = 0
    copies: int = 0
    skipped: int = 0  # messages that break their schema (the processors dead-lettered them)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def render(self) -> str:
        return (f"replayed {self.instances} instance event(s) and {self.copies} copy event(s) in "
                f"{self.seconds:.1f} s; skipped {self.skipped} message(s) that break the contract")


def _consumer(config: GridConfig) -> Consumer:
    return Consumer({**config.kafka.client_config(), "group.id": f"dicomgrid-reindex-{uuid.uuid4()}",
                     "enable.auto.commit": False, "auto.offset.reset": "earliest"})


def _log_of(config: GridConfig, dc: str | None) -> tuple[GridConfig, str | None]:
    """Where the event log is read: the shared cluster; or, with a Kafka cluster per site, the cluster
    of the site in datacenter ``dc`` (else the first site), whose own and mirrored topics hold every
    site's events."""
    if not config.kafka_per_site:
        return config, None
    site = next((s.name for s in config.sites if s.cassandra_dc == dc), config.sites[0].name)
    return config.for_site(site), site


def _extent(config: GridConfig, logical: str, site: str | None = None) -> dict[TopicPartition, int]:
    """Each non-empty partition of a topic (and, given ``site``, of the topics mirrored into its
    cluster), at its first offset, with its end offset as of now."""
    topics = config.consumed_topics(site, logical) if site is not None else [config.kafka.topic(logical)]
    consumer = _consumer(config)
    try:
        extent = {}
        for topic in topics:
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high > low:
                    extent[TopicPartition(topic, p, low)] = high
        return extent
    finally:
        consumer.close()


def _values(config: GridConfig, extent: dict[TopicPartition, int]) -> Iterator[bytes]:
    """The values of every message within ``extent``."""
    if not extent:
        return
    consumer = _consumer(config)
    try:
        consumer.assign(list(extent))
        ends = {(tp.topic, tp.partition): high for tp, high in extent.items()}
        remaining = dict(ends)
        while remaining:
            for msg in consumer.consume(1000, timeout=5.0):
                where = (msg.topic(), msg.partition())
                if msg.error() is not None or where not in remaining:
                    continue
                if msg.offset() >= remaining[where] - 1:
                    del remaining[where]
                if msg.offset() < ends[where]:
                    yield msg.value()
    finally:
        consumer.close()


def _decoded(values: Iterator[bytes], topic: str, report: ReindexReport) -> Iterator[dict]:
    for value in values:
        try:
            event = json.loads(value)
            schemas.validate_event(topic, event)
        except (TypeError, ValueError, schemas.InvalidEvent):
            report.skipped += 1
            continue
        yield event


def reindex(config: GridConfig, dc: str, on_progress: Callable[[int], None] = lambda n: None) -> ReindexReport:
    """Rebuild the grid's keyspace, as read and written in datacenter ``dc``, from the event log."""
    report = ReindexReport()
    started = time.monotonic()
    apply_schema(config)
    db = Cassandra(config, local_dc=dc)
    config, site = _log_of(config, dc)
    try:
        indexer = Indexer(IndexWriter(db))
        values = _values(config, _extent(config, schemas.TOPIC_INSTANCE_STORED, site))
        batch: list[dict] = []
        for event in _decoded(values, schemas.TOPIC_INSTANCE_STORED, report):
            batch.append(event)
            if len(batch) >= BATCH:
                indexer.apply(batch)
                report.instances += len(batch)
                on_progress(len(batch))
                batch = []
        if batch:
            indexer.apply(batch)
            report.instances += len(batch)
            on_progress(len(batch))
        values = _values(config, _extent(config, schemas.TOPIC_REPLICA_STORED, site))
        for event in _decoded(values, schemas.TOPIC_REPLICA_STORED, report):
            replica = event["replica"]
            at = dt.datetime.fromisoformat(event["occurred_at"].replace("Z", "+00:00"))
            stmt, params = replica_write(db, BlobRef(replica["site"], replica["sha256"], replica["size"]), at, at)
            db.session.execute(stmt, params)
            report.copies += 1
            on_progress(1)
    finally:
        db.close()
    report.seconds = time.monotonic() - started
    log.info("reindexed from the event log", dc=dc, **report.as_dict())
    return report


def total_events(config: GridConfig, dc: str | None = None) -> int:
    """Messages a replay via ``dc`` reads (for a progress bar)."""
    config, site = _log_of(config, dc)
    return sum(high - tp.offset for topic in (schemas.TOPIC_INSTANCE_STORED, schemas.TOPIC_REPLICA_STORED)
               for tp, high in _extent(config, topic, site).items())

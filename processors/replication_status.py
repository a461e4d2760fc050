"""`dicomgrid replication status`: what the replication workers have left to do, and how fast they are.

Read from the event log and the ledger, never from the workers themselves, so it works while a worker
is down (which is when it matters):

- **pending**: requests addressed to a site that its worker has not committed yet (its consumer
  group's committed offsets to the end of ``dicom.replication.requested``);
- **failed**: requests that gave up (``dicom.replication.failed``, within the window) for a copy the
  ledger still does not list as verified at that site;
- **under-replicated**: distinct payloads among those with fewer than ``min_copies`` verified copies;
- **lag**: from an instance's receipt at its first site to a verified copy at another
  (``dicom.replica.stored`` within the window), p50 and p99 per site.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from dicomgrid import schemas
from dicomgrid.core.config import GridConfig
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.ledger import ReplicaLedger
from dicomgrid.processors.replicator import replication_group

# Messages read per topic at most; beyond it the counts say "at least".
SCAN_LIMIT = 200_000


@dataclass
class SiteReplication:
    site: str
    pending: int = 0
    failed: int = 0
    copies: int = 0  # verified copies made within the window
    lag_p50_s: float | None = None
    lag_p99_s: float | None = None


@dataclass
class ReplicationStatus:
    window_s: float
    min_copies: int
    sites: list[SiteReplication] = field(default_factory=list)
    under_replicated: int = 0
    truncated: bool = False  # a scan hit SCAN_LIMIT: counts are lower bounds

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def render(self) -> str:
        def secs(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines = [f"{'site':<10} {'pending':>8} {'failed':>7} {'copies':>7} {'lag p50 s':>10} {'lag p99 s':>10}"]
        for s in self.sites:
            lines.append(f"{s.site:<10} {s.pending:>8} {s.failed:>7} {s.copies:>7} {secs(s.lag_p50_s):>10} "
                         f"{secs(s.lag_p99_s):>10}")
        more = "at least " if self.truncated else ""
        lines.append(f"under-replicated instances (< {self.min_copies} verified copies): {more}{self.under_replicated}")
        lines.append(f"(copies and lag over the last {self.window_s / 60:.0f} min)")
        return "\n".join(lines)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


class TopicReader:
    """Reads ranges of the grid's topics without joining any consumer group."""

    def __init__(self, config: GridConfig) -> None:
        self.config = config
        self.truncated = False
        self._consumer = Consumer({**config.kafka.client_config(), "group.id": f"dicomgrid-status-{uuid.uuid4()}",
                                   "enable.auto.commit": False, "log_level": 3})

    def close(self) -> None:
        self._consumer.close()

    def partitions(self, logical: str) -> list[TopicPartition]:
        topic = self.config.kafka.topic(logical)
        metadata = self._consumer.list_topics(topic, timeout=10)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise KafkaException(f"topic {topic} not found: run `dicomgrid schema apply`")
        return [TopicPartition(topic, p) for p in metadata.topics[topic].partitions]

    def committed(self, logical: str, group: str) -> list[TopicPartition]:
        """Where ``group`` stands on each partition (the start of the partition if it never committed)."""
        probe = Consumer({**self.config.kafka.client_config(), "group.id": group, "enable.auto.commit": False,
                          "log_level": 3})
        try:
            committed = probe.committed(self.partitions(logical), timeout=10)
        finally:
            probe.close()
        out = []
        for tp in committed:
            low, _ = self._consumer.get_watermark_offsets(tp, timeout=10)
            out.append(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else low))
        return out

    def since(self, logical: str, seconds: float) -> list[TopicPartition]:
        """The first offset of each partition at or after ``seconds`` ago."""
        at = int((time.time() - seconds) * 1000)
        wanted = [TopicPartition(tp.topic, tp.partition, at) for tp in self.partitions(logical)]
        return [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
                for tp in self._consumer.offsets_for_times(wanted, timeout=10)]

    def lag(self, logical: str, group: str) -> int:
        """Messages of the topic ``group`` has not committed yet (offsets only, nothing read)."""
        return sum(self._consumer.get_watermark_offsets(tp, timeout=10)[1] - tp.offset
                   for tp in self.committed(logical, group))

    def count_since(self, logical: str, seconds: float) -> int:
        """How many messages the topic took in the last ``seconds`` (offsets only, nothing read)."""
        total = 0
        for tp in self.since(logical, seconds):
            low, high = self._consumer.get_watermark_offsets(tp, timeout=10)
            total += high - (high if tp.offset == OFFSET_END else max(tp.offset, low))
        return total

    def read(self, starts: list[TopicPartition]) -> Iterator[dict[str, Any]]:
        """Every message from ``starts`` to the current end of each partition, decoded."""
        ends = {}
        for tp in starts:
            _, high = self._consumer.get_watermark_offsets(tp, timeout=10)
            start = high if tp.offset == OFFSET_END else tp.offset
            if start < high:
                ends[tp.partition] = high
        if not ends:
            return
        self._consumer.assign([tp for tp in starts if tp.partition in ends])
        seen = 0
        while ends:
            batch = self._consumer.consume(1000, timeout=2.0)
            if not batch:
                break
            for msg in batch:
                if msg.error() is not None or msg.partition() not in ends:
                    continue
                if msg.offset() >= ends[msg.partition()] - 1:
                    del ends[msg.partition()]
                seen += 1
                if seen > SCAN_LIMIT:
                    self.truncated = True
                    return
                try:
                    yield json.loads(msg.value())
                except (TypeError, ValueError):
                    continue  # dead-lettered by the processors
        self._consumer.unassign()


def verified_copies(index: IndexReader, ledger: ReplicaLedger, sop_instance_uids: list[str]) -> dict[str, set[str]]:
    """The sites holding a verified copy of each instance's indexed payload (empty: not indexed yet)."""
    out = {}
    for uid in sop_instance_uids:
        location = index.instance_location(uid)
        out[uid] = ledger.verified_sites(location.sha256) if location is not None else set()
    return out


def replication_status(config: GridConfig, ledger: ReplicaLedger, window_s: float = 900.0) -> ReplicationStatus:
    status = ReplicationStatus(window_s, config.min_copies, [SiteReplication(s.name) for s in config.sites])
    by_site = {s.site: s for s in status.sites}
    suspects: set[str] = set()
    reader = TopicReader(config)
    try:
        for site in by_site:
            group = replication_group(config, site)
            for request in reader.read(reader.committed(schemas.TOPIC_REPLICATION_REQUESTED, group)):
                if request.get("target_site") == site:
                    by_site[site].pending += 1
                    suspects.add(request["source"]["sha256"])
        for failure in reader.read(reader.since(schemas.TOPIC_REPLICATION_FAILED, window_s)):
            site, digest = failure.get("target_site"), failure.get("source", {}).get("sha256")
            if site in by_site and digest and site not in ledger.verified_sites(digest):
                by_site[site].failed += 1
                suspects.add(digest)
        lags: dict[str, list[float]] = {site: [] for site in by_site}
        for copy in reader.read(reader.since(schemas.TOPIC_REPLICA_STORED, window_s)):
            site = copy.get("replica", {}).get("site")
            if site in by_site:
                by_site[site].copies += 1
                if copy.get("received_at"):
                    lags[site].append((_ts(copy["occurred_at"]) - _ts(copy["received_at"])).total_seconds())
        for site, values in lags.items():
            by_site[site].lag_p50_s, by_site[site].lag_p99_s = _quantile(values, 0.5), _quantile(values, 0.99)
        status.under_replicated = sum(1 for digest in suspects if len(ledger.verified_sites(digest)) < config.min_copies)
        status.truncated = reader.truncated
    finally:
        reader.close()
    return status

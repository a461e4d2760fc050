"""The Parquet sink: the grid's events as datasets researchers and auditors can query (pyarrow, DuckDB).

Two datasets under ``analytics.directory``, hive-partitioned:

- ``instances/date=YYYY-MM-DD/modality=XX/site=S/``: one row per ``dicom.instance.stored`` (instance
  metadata without the patient's name, ID or birth date, study descriptions or accession numbers: a
  research dataset carries no direct identifiers);
- ``audit/date=YYYY-MM-DD/site=S/``: one row per ``dicom.audit`` record, kept for years (it does name
  patients: it is the audit trail).

The sink runs in a consumer group of its own. Rows are buffered per Kafka partition and written out
together, a file per dataset partition, named by the Kafka partition and the offsets it holds; once the
files of a flush are durable (fsync, rename, directory fsync) a progress marker for that partition is
written, and only then is the offset committed. The markers, not the committed offsets, say where to
resume, and files beyond a marker (a flush cut short by a crash) are removed at start-up: a sink killed
at any moment neither loses nor duplicates a row.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import Consumer, TopicPartition

from dicomgrid import schemas
from dicomgrid.core.config import GridConfig
from dicomgrid.core.kafka import FETCH_MAX_WAIT_MS, FETCH_MIN_BYTES
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

INSTANCES = pa.schema([
    ("received_at", pa.timestamp("us", tz="UTC")), ("study_uid", pa.string()), ("series_uid", pa.string()),
    ("sop_instance_uid", pa.string()), ("sop_class_uid", pa.string()), ("transfer_syntax_uid", pa.string()),
    ("study_date", pa.string()), ("body_part_examined", pa.string()), ("series_number", pa.int64()),
    ("instance_number", pa.int64()), ("rows", pa.int64()), ("columns", pa.int64()),
    ("number_of_frames", pa.int64()), ("size", pa.int64()), ("sha256", pa.string()), ("version", pa.int64()),
    ("source_protocol", pa.string()), ("calling_ae", pa.string()), ("event_id", pa.string()),
])
AUDIT = pa.schema([
    ("occurred_at", pa.timestamp("us", tz="UTC")), ("event", pa.string()), ("event_code", pa.string()),
    ("action", pa.string()), ("outcome", pa.int64()), ("outcome_description", pa.string()),
    ("participants", pa.string()), ("objects", pa.string()), ("event_id", pa.string()),
])


def _time(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _part(value: str | None) -> str:
    """A partition value that is a safe directory name (modalities come from senders)."""
    text = re.sub(r"[^A-Za-z0-9_-]", "_", value or "")[:16]
    return text or "none"


def instance_row(event: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """(partition keys, row) of a ``dicom.instance.stored`` event."""
    study, series, inst, payload = event["study"], event["series"], event["instance"], event["payload"]
    keys = {"date": event["occurred_at"][:10], "modality": _part(series.get("modality")), "site": _part(event["site"])}
    row = {
        "received_at": _time(event["occurred_at"]), "study_uid": study["uid"], "series_uid": series["uid"],
        "sop_instance_uid": inst["sop_instance_uid"], "sop_class_uid": inst["sop_class_uid"],
        "transfer_syntax_uid": inst["transfer_syntax_uid"], "study_date": study.get("date"),
        "body_part_examined": series.get("body_part_examined"), "series_number": _int(series.get("number")),
        "instance_number": _int(inst.get("number")), "rows": _int(inst.get("rows")),
        "columns": _int(inst.get("columns")), "number_of_frames": _int(inst.get("number_of_frames")),
        "size": payload["size"], "sha256": payload["sha256"], "version": _int(event.get("version")),
        "source_protocol": event["source"]["protocol"], "calling_ae": event["source"].get("calling_ae"),
        "event_id": event["event_id"],
    }
    return keys, row


def audit_row(record: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    keys = {"date": record["occurred_at"][:10], "site": _part(record["site"])}
    row = {
        "occurred_at": _time(record["occurred_at"]), "event": record["event"],
        "event_code": record.get("event_code", {}).get("code"), "action": record["action"],
        "outcome": record["outcome"], "outcome_description": record["outcome_description"],
        "participants": json.dumps(record["participants"], ensure_ascii=False),
        "objects": json.dumps(record["objects"], ensure_ascii=False), "event_id": record["event_id"],
    }
    return keys, row


@dataclass(frozen=True)
class Dataset:
    name: str
    topic: str  # logical
    schema: pa.Schema
    row: Callable[[dict[str, Any]], tuple[dict[str, str], dict[str, Any]]]


DATASETS = (Dataset("instances", schemas.TOPIC_INSTANCE_STORED, INSTANCES, instance_row),
            Dataset("audit", schemas.TOPIC_AUDIT, AUDIT, audit_row))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DatasetWriter:
    """Writes one dataset's rows durably and keeps its progress markers (one per Kafka partition)."""

    def __init__(self, root: Path, dataset: Dataset) -> None:
        self.dataset = dataset
        self.root = root / dataset.name
        self.markers = root / "_progress" / dataset.name
        self.markers.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def _marker(self, partition: int) -> Path:
        return self.markers / f"p{partition}.json"

    def progress(self, partition: int) -> int:
        """The last offset of ``partition`` whose row is durably in the dataset (-1: none)."""
        try:
            return int(json.loads(self._marker(partition).read_text())["offset"])
        except (FileNotFoundError, ValueError, KeyError):
            return -1

    def clean(self, partition: int) -> int:
        """Remove files of ``partition`` beyond its marker (a flush cut short); returns how many."""
        done, removed = self.progress(partition), 0
        pattern = re.compile(rf"part-p{partition}-o(\d+)-(\d+)\.parquet$")
        for path in list(self.root.rglob(f"part-p{partition}-*.parquet")) + list(self.root.rglob(".tmp-*")):
            match = pattern.match(path.name)
            if path.name.startswith(".tmp-") or (match and int(match.group(1)) > done):
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("files of an unfinished flush removed", dataset=self.dataset.name, partition=partition,
                        files=removed)
        return removed

    def write(self, partition: int, first: int, last: int, rows: Iterable[tuple[dict[str, str], dict[str, Any]]]) -> int:
        """Write the rows of offsets ``first``..``last`` of ``partition``, then move its marker to ``last``."""
        groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
        for keys, row in rows:
            groups.setdefault(tuple(keys.items()), []).append(row)
        staged = []
        for keys, group in groups.items():
            directory = self.root.joinpath(*(f"{k}={v}" for k, v in keys))
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".tmp-{uuid.uuid4().hex}"
            pq.write_table(pa.Table.from_pylist(group, schema=self.dataset.schema), tmp)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            staged.append((tmp, directory / f"part-p{partition}-o{first}-{last}.parquet"))
        for tmp, final in staged:
            os.replace(tmp, final)
        for directory in {final.parent for _, final in staged}:
            _fsync_dir(directory)
        marker_tmp = self._marker(partition).with_suffix(".tmp")
        marker_tmp.write_text(json.dumps({"offset": last}))
        with marker_tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(marker_tmp, self._marker(partition))
        _fsync_dir(self.markers)
        return sum(len(g) for g in groups.values())


@dataclass
class _Buffer:
    first: int
    last: int
    rows: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)


class ParquetSink:
    def __init__(self, config: GridConfig, root: Path, *, flush_rows: int, flush_s: float) -> None:
        self.config = config
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.writers = {config.kafka.topic(d.topic): DatasetWriter(root, d) for d in DATASETS}
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._consumer = Consumer({
            **config.kafka.client_config(), "group.id": sink_group(config), "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # Rows are buffered for flush_s anyway: the broker may hold a fetch until a batch is there,
            # instead of answering one for nearly every event while the receivers wait on it.
            "fetch.min.bytes": FETCH_MIN_BYTES,
            "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,
        })

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Resume where the dataset says, whatever Kafka has committed.
        for tp in partitions:
            writer = self.writers[tp.topic]
            writer.clean(tp.partition)
            done = writer.progress(tp.partition)
            if done >= 0:
                tp.offset = done + 1
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.flush(force=True)

    def run(self, should_stop: Callable[[], bool]) -> None:
        self._consumer.subscribe(list(self.writers), on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not should_stop():
                for msg in self._consumer.consume(1000, timeout=1.0):
                    if msg.error() is not None:
                        continue
                    self._add(msg)
                self.flush()
            self.flush(force=True)
        finally:
            self._consumer.close()

    def _add(self, msg: Any) -> None:
        key = (msg.topic(), msg.partition())
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _Buffer(msg.offset(), msg.offset())
        buffer.last = msg.offset()
        writer = self.writers[msg.topic()]
        try:
            event = json.loads(msg.value())
            schemas.validate_event(writer.dataset.topic, event)
            buffer.rows.append(writer.dataset.row(event))
        except (TypeError, ValueError, KeyError):  # the processors dead-letter what breaks the contract
            log.warning("message left out of the dataset", dataset=writer.dataset.name, partition=msg.partition(),
                        offset=msg.offset())

    def flush(self, *, force: bool = False) -> None:
        for (topic, partition), buffer in list(self._buffers.items()):
            due = force or len(buffer.rows) >= self.flush_rows or time.monotonic() - buffer.since >= self.flush_s
            if not due:
                continue
            written = self.writers[topic].write(partition, buffer.first, buffer.last, buffer.rows)
            self._consumer.commit(offsets=[TopicPartition(topic, partition, buffer.last + 1)], asynchronous=False)
            log.info("rows written", dataset=self.writers[topic].dataset.name, partition=partition, rows=written,
                     offsets=f"{buffer.first}-{buffer.last}")
            del self._buffers[(topic, partition)]


def sink_group(config: GridConfig) -> str:
    return f"{config.name}-parquet-sink"


def analytics_root(config: GridConfig) -> Path:
    return config.resolve(config.analytics.directory) if config.analytics.directory else \
        config.root / "analytics" / config.name

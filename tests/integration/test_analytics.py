"""The analytics side of the grid: the Parquet sink's datasets, the on-demand export, the documented
examples, and every event of the session matching its schema version."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from dicomgrid import schemas
from dicomgrid.consumers.parquet_sink import analytics_root
from tests.dicom_samples import make_instance
from tests.grid import wait_for
from tests.integration.test_ingest_grid import c_store, events_for

pytestmark = [pytest.mark.cluster]

DOCS = Path(__file__).parents[2] / "docs" / "events.md"


def rows_of(root: Path, dataset: str, column: str, wanted: set[str]) -> list[str]:
    """The values of ``column`` in a dataset that are in ``wanted``, once per row."""
    path = root / dataset
    if not any(p.name.endswith(".parquet") for p in path.rglob("part-*")):
        return []
    table = pads.dataset(path, format="parquet", partitioning="hive").to_table(columns=[column])
    return [v for v in table.column(column).to_pylist() if v in wanted]


def test_the_sink_writes_instances_and_audit_records_partitioned(grid, taps):
    root = analytics_root(grid.config)
    stored = [make_instance(modality=m) for m in ("CT", "CT", "MR")]
    tap = taps()
    assert c_store(grid.site("A"), stored) == [0, 0, 0]
    uids = {ds.SOPInstanceUID for ds in stored}
    events = events_for(tap, uids)
    wait_for(lambda: len(rows_of(root, "instances", "sop_instance_uid", uids)) == 3, timeout=60)
    table = pads.dataset(root / "instances", format="parquet", partitioning="hive").to_table()
    mine = table.filter(pads.field("sop_instance_uid").isin(list(uids))).to_pylist()
    assert {(r["modality"], r["site"], r["date"]) for r in mine} == {
        (m, "A", events[0]["occurred_at"][:10]) for m in ("CT", "MR")}
    assert "patient_name" not in table.column_names and "patient_id" not in table.column_names
    assert {r["sha256"] for r in mine} == {e["payload"]["sha256"] for e in events}
    audit_ids = {e["event_id"] for e in taps(schemas.TOPIC_AUDIT, from_start=True).catch_up()}
    wait_for(lambda: rows_of(root, "audit", "event_id", audit_ids), timeout=60)


def test_a_sink_killed_mid_file_neither_loses_nor_duplicates_a_row(grid, tmp_path):
    root = analytics_root(grid.config)
    sinks = [s for s in grid.supervisor.services() if s.kind == "sink"]
    for service in sinks:
        grid.supervisor.stop_service(service)
    config_file = tmp_path / "eager-sink.toml"
    config_file.write_text(re.sub(r"flush_rows = \d+", "flush_rows = 3", grid.config_file.read_text()))
    argv = [sys.executable, "-m", "dicomgrid", "--config", str(config_file), "serve", "sink", "--site", "A"]
    stored = [make_instance() for _ in range(60)]
    uids = {ds.SOPInstanceUID for ds in stored}
    rng = random.Random(11)
    try:
        sent = 0
        for _ in range(6):
            sink = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            batch = stored[sent:sent + 10]
            assert c_store(grid.site("A"), batch) == [0] * len(batch)
            sent += len(batch)
            time.sleep(rng.uniform(0.5, 3.0))
            os.killpg(sink.pid, signal.SIGKILL)  # whatever it was doing: consuming, writing, renaming
            sink.wait(10)
    finally:
        grid.supervisor.up(timeout=90)
    found = wait_for(lambda: (r := rows_of(root, "instances", "sop_instance_uid", uids)) and len(set(r)) == 60 and r,
                     timeout=90)
    assert sorted(found) == sorted(uids), "every instance exactly once"
    assert not list(root.rglob(".tmp-*"))


def test_export_parquet_writes_the_same_dataset_from_the_index(grid, taps, tmp_path):
    from tests.fault.whole import assert_whole

    stored = [make_instance(modality="US")]
    assert c_store(grid.site("A"), stored) == [0]

    assert_whole(grid, stored)
    done = subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(grid.config_file), "export",
                           "parquet", str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = pads.dataset(tmp_path / "out" / "instances", format="parquet", partitioning="hive").to_table()
    (row,) = table.filter(pads.field("sop_instance_uid") == stored[0].SOPInstanceUID).to_pylist()
    assert (row["modality"], row["site"]) == ("US", "A")
    sink_columns = set(pads.dataset(analytics_root(grid.config) / "instances", format="parquet",
                                    partitioning="hive").schema.names)
    assert set(table.schema.names) == sink_columns


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_documented_examples_run(grid):
    stored = [make_instance(modality="CT")]
    assert c_store(grid.site("A"), stored) == [0]
    root = analytics_root(grid.config)
    wait_for(lambda: rows_of(root, "instances", "sop_instance_uid", {stored[0].SOPInstanceUID}), timeout=60)
    subscriber, query = _code_blocks(DOCS.read_text())
    # The session's grid has a topic prefix; the event_type header stays the logical topic name.
    subscriber = subscriber.replace('subscribe(["dicom.instance.stored"])',
                                    f'subscribe(["{grid.config.kafka.topic(schemas.TOPIC_INSTANCE_STORED)}"])')
    subscriber = subscriber.replace("research-modality-counts", f"docs-example-{os.getpid()}")
    query = query.replace(".dicomgrid/analytics/dicomgrid-local", str(root))
    for code in (subscriber, query):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "CT" in done.stdout


def test_every_event_of_the_session_matches_its_schema_version(grid, taps, kafka_clients):
    """What the services emitted so far in this session, topic by topic: each message validates, or is
    one the processors dead-lettered (tests publish poison on purpose)."""
    import json
    import uuid

    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    from tests.grid import end_offsets, partitions_of

    assert c_store(grid.site("A"), [make_instance()]) == [0]
    dead = {(d["topic"], d["partition"], d["offset"]) for d in taps(schemas.TOPIC_DEADLETTER, from_start=True).catch_up()}
    consumer = kafka_clients(Consumer({**grid.config.kafka.client_config(), "group.id": f"contract-{uuid.uuid4()}",
                                       "enable.auto.commit": False}))
    admin = AdminClient(grid.config.kafka.client_config())
    checked = 0
    for logical in schemas.topics():
        topic = grid.config.kafka.topic(logical)
        ends = {p: high for p, high in end_offsets(admin, partitions_of(admin, topic)).items() if high}
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        while ends:
            for msg in consumer.consume(500, timeout=2.0):
                if msg.error() is not None:
                    continue
                if msg.offset() >= ends.get(msg.partition(), 0) - 1:
                    ends.pop(msg.partition(), None)
                if (topic, msg.partition(), msg.offset()) in dead:
                    continue
                event = json.loads(msg.value())
                assert event["event_type"] == logical
                assert dict(msg.headers() or []).get("schema_version") == str(event["schema_version"]).encode()
                schemas.validate_event(logical, event)
                checked += 1
        consumer.unassign()
    assert checked > 10

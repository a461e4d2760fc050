"""The indexer against real Cassandra: idempotent under replay, newest version wins in any order."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid

import pytest
from pydicom.uid import generate_uid

from dicomgrid import schemas
from dicomgrid.core.cassandra import Cassandra, apply_schema
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.index_writer import IndexWriter
from dicomgrid.processors.indexer import Indexer
from tests.grid import wait_for

pytestmark = [pytest.mark.cluster]


def event(study: str, series: str, sop: str, *, version: int = 1, when: dt.datetime, payload: bytes = b"x",
          modality: str = "CT") -> dict:
    digest = hashlib.sha256(payload + sop.encode()).hexdigest()
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": schemas.TOPIC_INSTANCE_STORED,
        "schema_version": 1,
        "occurred_at": when.isoformat().replace("+00:00", "Z"),
        "site": "A",
        "source": {"protocol": "DIMSE", "calling_ae": "STORESCU", "called_ae": "GRID_A", "peer_address": None},
        "patient": {"id": "IDX-1", "issuer": None, "name": "Index^Test", "birth_date": None, "sex": "O"},
        "study": {"uid": study, "date": "20240301", "time": None, "accession_number": "A1", "id": None,
                  "description": None, "referring_physician_name": None, "specific_character_set": None},
        "series": {"uid": series, "modality": modality, "number": 1, "description": None,
                   "body_part_examined": None, "date": None, "time": None},
        "instance": {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "sop_instance_uid": sop,
                     "transfer_syntax_uid": "1.2.840.10008.1.2.1", "number": 1, "rows": None, "columns": None,
                     "number_of_frames": None},
        "payload": {"uri": f"blob://A/sha256/{digest}", "site": "A", "sha256": digest, "size": 10},
        "version": version,
        "replaces": None,
    }


@pytest.fixture(scope="module")
def store(cluster):
    config = cluster.model_copy(update={"cassandra": cluster.cassandra.model_copy(update={"keyspace": "dicomgrid_test"})})
    apply_schema(config)
    store = IndexReader(Cassandra(config, local_dc="dc1"))
    yield store
    store.db.close()


def snapshot(store: IndexReader, study: str):
    row = store.study(study)
    return (
        (row.number_of_instances, row.number_of_series, row.modalities_in_study, row.patient_name),
        sorted((r.sop_instance_uid, r.sha256, r.version) for r in store.instances_of_study(study)),
    )


def test_replay_is_idempotent(store):
    now = dt.datetime.now(dt.timezone.utc)
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    events = [event(study, s1, generate_uid(), when=now), event(study, s1, generate_uid(), when=now),
              event(study, s2, generate_uid(), when=now, modality="SR")]
    for e in events:
        schemas.validate_event(schemas.TOPIC_INSTANCE_STORED, e)
    indexer = Indexer(IndexWriter(store.db))
    indexer.apply(events)
    first = snapshot(store, study)
    assert first[0] == (3, 2, {"CT", "SR"}, "Index^Test")
    indexer.apply(events)  # redelivery of the whole batch
    indexer.apply(events[1:2])  # and of one event on its own
    assert snapshot(store, study) == first


def test_newest_version_wins_whatever_the_order(store):
    now = dt.datetime.now(dt.timezone.utc)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    v1 = event(study, series, sop, when=now, payload=b"one")
    v2 = event(study, series, sop, version=2, when=now + dt.timedelta(seconds=1), payload=b"two")
    v2["replaces"] = {"sha256": v1["payload"]["sha256"], "version": 1}
    Indexer(IndexWriter(store.db)).apply([v2])
    Indexer(IndexWriter(store.db)).apply([v1])  # the older event arrives late (replay, partition lag)
    location = store.instance_location(sop)
    assert (location.sha256, location.version) == (v2["payload"]["sha256"], 2)
    versions = {r.sha256 for r in store.db.execute("SELECT sha256 FROM instance_versions WHERE sop_instance_uid = ?", (sop,))}
    assert versions == {v1["payload"]["sha256"], v2["payload"]["sha256"]}
    assert store.study(study).number_of_instances == 1


def test_written_in_dc1_readable_in_dc2(store, cluster):
    study = generate_uid()
    Indexer(IndexWriter(store.db)).apply([event(study, generate_uid(), generate_uid(), when=dt.datetime.now(dt.timezone.utc))])
    other = IndexReader(Cassandra(store.db.config, local_dc="dc2"))
    try:
        assert wait_for(lambda: other.study(study), timeout=10).patient_id == "IDX-1"
    finally:
        other.db.close()


def test_study_aggregates_follow_batches_and_replaced_versions(store):
    # Counts come from Cassandra per series; SOP classes grow batch by batch, and a version that
    # replaces an instance with another class makes the indexer read the set again from the rows.
    now = dt.datetime.now(dt.timezone.utc)
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    sop = generate_uid()
    indexer = Indexer(IndexWriter(store.db))
    indexer.apply([event(study, s1, sop, when=now), event(study, s1, generate_uid(), when=now)])
    sr = event(study, s2, generate_uid(), when=now, modality="SR")
    sr["instance"]["sop_class_uid"] = "1.2.840.10008.5.1.4.1.1.88.22"
    indexer.apply([sr])
    row = store.study(study)
    assert (row.number_of_instances, row.number_of_series) == (3, 2)
    assert row.sop_classes_in_study == {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.22"}
    assert {r.series_uid: r.number_of_instances for r in store.series_of_study(study)} == {s1: 2, s2: 1}

    # The only Comprehensive SR is replaced by a Basic Text SR version: the old class leaves the study.
    replaced = event(study, s2, sr["instance"]["sop_instance_uid"], version=2, modality="SR",
                     when=now + dt.timedelta(seconds=1), payload=b"v2")
    replaced["instance"]["sop_class_uid"] = "1.2.840.10008.5.1.4.1.1.88.11"
    replaced["replaces"] = {"sha256": sr["payload"]["sha256"], "version": 1}
    indexer.apply([replaced])
    row = store.study(study)
    assert (row.number_of_instances, row.number_of_series) == (3, 2)
    assert row.sop_classes_in_study == {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.11"}


def test_one_batch_writes_the_newest_study_attributes_whatever_the_order(store):
    now = dt.datetime.now(dt.timezone.utc)
    study, series = generate_uid(), generate_uid()
    newer = event(study, series, generate_uid(), when=now + dt.timedelta(seconds=5))
    newer["patient"]["name"] = "Renamed^Patient"
    older = event(study, series, generate_uid(), when=now)
    Indexer(IndexWriter(store.db)).apply([newer, older])
    row = store.study(study)
    assert row.patient_name == "Renamed^Patient"
    assert row.first_received_at.replace(tzinfo=dt.timezone.utc) == now.replace(microsecond=now.microsecond // 1000 * 1000)
    assert row.number_of_instances == 2

"""Payload replication on the real grid: DCMTK stores at one site, the other holds a verified copy.

Also the stream processors' robustness: poison events go to the dead-letter topic while later events
are indexed, processors started before their topics exist pick them up, and `dicomgrid up` refuses a
cluster without the schema.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Producer
from pydicom.uid import generate_uid

from dicomgrid import schemas
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.events import InstanceRef, Source, replication_requested
from dicomgrid.core.kafka import delete_topics, ensure_topics
from dicomgrid.core.ledger import LOOKUP_SLICE, ReplicaLedger
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool
from dicomgrid.producers.ingest import Ingestor
from tests.dicom_samples import make_instance, to_part10
from dicomgrid.processors.replicator import replication_group
from tests.grid import committed_lag, wait_for
from tests.integration.test_ingest_grid import c_store, events_for

pytestmark = [pytest.mark.cluster]


def storescu(site, files_dir: Path) -> None:
    """DCMTK storescu sends a folder to a site (TCP_NODELAY=1: no delayed-ACK stalls)."""
    done = subprocess.run(
        [require_dcmtk_tool("storescu"), "-aec", site.ae_title, "-aet", "STORESCU", "+sd", "+r", site.dicom_host,
         str(site.dicom_port), str(files_dir)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def ledger(grid):
    db = Cassandra(grid.config, local_dc="dc2")
    yield ReplicaLedger(db)
    db.close()


def copies(tap, digests: set[str], n: int | None = None, timeout: float = 60.0) -> list[dict]:
    """``dicom.replica.stored`` events for ``digests`` seen by ``tap`` (waits for ``n``, default one each)."""
    count = len(digests) if n is None else n

    def matching(seen):
        return [e for e in seen if e["replica"]["sha256"] in digests]

    return matching(tap.collect(lambda seen: len(matching(seen)) >= count, timeout=timeout))


def test_instances_stored_at_a_site_reach_the_other_verified(grid, ledger, taps, tmp_path):
    stored_tap, copy_tap = taps(), taps(schemas.TOPIC_REPLICA_STORED)
    study = generate_uid()
    datasets = [make_instance(study_uid=study, pixel_bytes=size) for size in (64, 4096, 300_000)]
    for ds in datasets:
        (tmp_path / f"{ds.SOPInstanceUID}.dcm").write_bytes(to_part10(ds))
    storescu(grid.site("A"), tmp_path)
    # One instance the other way round, from B to A.
    back = make_instance(study_uid=study)
    assert c_store(grid.site("B"), [back]) == [0]

    events = events_for(stored_tap, [ds.SOPInstanceUID for ds in [*datasets, back]])
    by_site = {e["payload"]["sha256"]: e["site"] for e in events}
    made = copies(copy_tap, set(by_site), timeout=60)
    blobs = {name: BlobStore(grid.config.site_storage(name), name) for name in ("A", "B")}
    for event in made:
        schemas.validate_event(schemas.TOPIC_REPLICA_STORED, event)
        digest, origin = event["replica"]["sha256"], by_site[event["replica"]["sha256"]]
        target = "B" if origin == "A" else "A"
        assert event["replica"]["site"] == target and event["source_site"] == origin
        assert event["cause"] == "replication" and event["study_uid"] == study
        # Byte-identical, verified, and the ledger lists both copies as verified.
        assert blobs[target].verify(digest)
        assert blobs[target].path(digest).read_bytes() == blobs[origin].path(digest).read_bytes()
        assert wait_for(lambda: ledger.verified_sites(digest) == {"A", "B"}, timeout=10)
    assert {e["replica"]["sha256"] for e in made} == set(by_site)


def test_the_copies_a_site_fetched_together_are_audited_in_one_record_each_instance_once(grid, taps):
    """B audits the replicas it fetched from A as transfers from A, collected (one record for up to 1,000
    copies, published at the latest 5 s after the first), not one record per copy."""
    stored_tap, copy_tap, audit_tap = taps(), taps(schemas.TOPIC_REPLICA_STORED), taps(schemas.TOPIC_AUDIT)
    study = generate_uid()
    datasets = [make_instance(study_uid=study) for _ in range(6)]
    assert c_store(grid.site("A"), datasets) == [0] * len(datasets)
    events = events_for(stored_tap, [ds.SOPInstanceUID for ds in datasets])
    copies(copy_tap, {e["payload"]["sha256"] for e in events})
    wanted = {ds.SOPInstanceUID for ds in datasets}

    def fetched(seen):
        return [r for r in seen if r["site"] == "B" and r["action"] == "C" and r["outcome"] == 0
                and any(o["type"] == "study" and o["id"] == study for o in r["objects"])]

    def named(records):  # a record may also name another study's copies fetched at the same time
        return [o["id"] for r in records for o in r["objects"]
                if o["type"] == "instance" and o["detail"]["study_uid"] == study]

    records = fetched(audit_tap.collect(lambda seen: set(named(fetched(seen))) >= wanted, timeout=60))
    assert sorted(named(records)) == sorted(wanted)
    assert len(records) < len(datasets)
    for record in records:
        schemas.validate_event(schemas.TOPIC_AUDIT, record)
        roles = {(p["user_id"], p["role"]) for p in record["participants"]}
        assert roles == {("A", "Source"), ("B", "Destination")}
        assert record["outcome_description"].startswith("replicas fetched from site A and verified")


def test_the_ledger_answers_for_many_payloads_at_once_as_for_each(grid, ledger, taps):
    """What anti-entropy asks the ledger for a thousand holdings at a time: every digest gets an answer
    (an empty set for one it does not know), across more than one look-up query."""
    stored_tap, copy_tap = taps(), taps(schemas.TOPIC_REPLICA_STORED)
    ds = make_instance()
    assert c_store(grid.site("A"), [ds]) == [0]
    (event,) = events_for(stored_tap, [ds.SOPInstanceUID])
    digest = event["payload"]["sha256"]
    copies(copy_tap, {digest})
    assert wait_for(lambda: ledger.verified_sites(digest) == {"A", "B"}, timeout=10)
    unknown = [f"{n:064x}" for n in range(2 * LOOKUP_SLICE)]
    answer = ledger.verified_sites_of([*unknown[:LOOKUP_SLICE], digest, *unknown[LOOKUP_SLICE:], digest])
    assert answer == {digest: {"A", "B"}, **{u: set() for u in unknown}}


def test_a_redelivered_request_makes_no_second_copy_or_row(grid, ledger, taps, publishers):
    copy_tap, stored_tap = taps(schemas.TOPIC_REPLICA_STORED), taps()
    ds = make_instance()
    assert c_store(grid.site("A"), [ds]) == [0]
    (event,) = events_for(stored_tap, [ds.SOPInstanceUID])
    digest = event["payload"]["sha256"]
    copies(copy_tap, {digest})
    # The same request again, as a crash before the worker's commit would deliver it.
    publisher = publishers(grid.config.kafka, "test-redelivery")
    request = replication_requested(event["payload"], "B", InstanceRef.of_event(event))
    publisher.publish_and_wait(schemas.TOPIC_REPLICATION_REQUESTED, digest, request)
    # A later request for a fresh payload, on its way through the same worker.
    sentinel = make_instance()
    assert c_store(grid.site("A"), [sentinel]) == [0]
    (sentinel_event,) = events_for(stored_tap, [sentinel.SOPInstanceUID])
    copies(copy_tap, {sentinel_event["payload"]["sha256"]})
    # The worker commits a request's offset only once it has settled it: wait until it has committed
    # everything, so a second copy event would be in the topic by now.
    wait_for(lambda: committed_lag(grid.config, schemas.TOPIC_REPLICATION_REQUESTED,
                                   replication_group(grid.config, "B")) == 0, timeout=60, interval=0.5)
    copy_tap.catch_up()
    assert [e["replica"]["sha256"] for e in copy_tap.seen].count(digest) == 1
    assert [r.site for r in ledger.replicas(digest)].count("B") == 1
    assert len(list((grid.config.site_storage("B") / "tmp").glob(f"{digest}*"))) == 0


def test_poison_events_are_dead_lettered_while_later_events_are_indexed(grid, metadata_dc1, taps):
    dead_tap = taps(schemas.TOPIC_DEADLETTER)
    valid = make_instance()
    # Poison on the partition the valid instance will use (same key: its study UID), before it.
    topic = grid.config.kafka.topic(schemas.TOPIC_INSTANCE_STORED)
    producer = Producer(grid.config.kafka.client_config())
    incomplete = {"event_id": "6f1c8f44-7a41-4b7e-9a7c-2f0f5b0c1a11", "event_type": "dicom.instance.stored",
                  "schema_version": 1, "occurred_at": "2026-01-01T00:00:00Z", "site": "A"}
    try:
        for value in (b"{not json", json.dumps(incomplete).encode()):
            producer.produce(topic, key=valid.StudyInstanceUID.encode(), value=value)
        assert producer.flush(10) == 0
    finally:
        del producer
    assert c_store(grid.site("A"), [valid]) == [0]
    wait_for(lambda: metadata_dc1.instance_location(valid.SOPInstanceUID), timeout=30)
    letters = dead_tap.collect(lambda seen: len([d for d in seen if d["processor"] == "indexer"]) >= 2, timeout=30)
    poison = [d for d in letters if d["processor"] == "indexer" and d["key"] == valid.StudyInstanceUID]
    assert len(poison) == 2
    assert {d["value"] for d in poison} == {"{not json", json.dumps(incomplete)}
    assert all(d["topic"] == topic for d in poison)
    assert any("not JSON" in d["reason"] for d in poison) and any("required" in d["reason"] for d in poison)
    for record in poison:
        schemas.validate_event(schemas.TOPIC_DEADLETTER, record)


def _cli(config_file: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(config_file), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_processors_started_before_their_topics_pick_them_up(grid, metadata_dc1, publishers, tmp_path):
    # A second grid on the same cluster and keyspace whose topics do not exist yet.
    name = f"{grid.config.name}-late"
    config_file = tmp_path / "late.toml"
    config_file.write_text(grid.config_file.read_text().replace(f'name = "{grid.config.name}"', f'name = "{name}"')
                           .replace(f'topic_prefix = "{grid.config.name}.', f'topic_prefix = "{name}.'))
    late = grid.config.model_copy(update={"name": name, "kafka": grid.config.kafka.model_copy(
        update={"topic_prefix": f"{name}."})})
    refused = _cli(config_file, "up", "--detach")
    assert refused.returncode != 0 and "dicomgrid schema apply" in refused.stderr
    worker = subprocess.Popen([sys.executable, "-m", "dicomgrid", "--config", str(config_file), "serve", "processors",
                               "--site", "A"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ensure_topics(late.kafka)
        # The late grid ingests in process, through the same path as a receiver. It audits nothing: its
        # processors would chain the record into site A's chain of the shared keyspace, signed with
        # the late grid's own key, and break the grid's chain for the audit tests that follow.
        publisher = publishers(late.kafka, "test-late-grid")
        ingestor = Ingestor("A", BlobStore(tmp_path / "blobs", "A"), publisher, None, AuditTrail("A", None))
        ds = make_instance()
        assert ingestor.ingest(io.BytesIO(to_part10(ds)), Source("DIMSE", "STORESCU", "GRID_A")).ok
        wait_for(lambda: metadata_dc1.instance_location(ds.SOPInstanceUID), timeout=90, interval=1.0)
    finally:
        worker.terminate()
        worker.wait(30)
        delete_topics(late.kafka)

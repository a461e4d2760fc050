"""Replication when a part of the grid fails: a worker killed mid-transfer or while it holds the audit
records of its copies, the source site's endpoint killed in the middle of a batch transfer, a source site
gone dark, the ledger's datacenter down during an anti-entropy sweep or while a batch of copies is
recorded.

The session grid's own replication worker of site B is stopped for these tests and a worker of the
test's own (same grid, same consumer group) runs in its place, so it can be throttled and killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cassandra import DriverException
from cassandra.cluster import NoHostAvailable
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.ledger import ReplicaLedger
from dicomgrid.core.site import open_site
from dicomgrid.core.transfer_audit import MAX_HOLD_S
from dicomgrid.deploy.local import LocalCluster
from dicomgrid.deploy.local.cassandra import CassandraNode
from dicomgrid.deploy.local.processes import listener_pid
from tests.dicom_samples import make_instance
from dicomgrid.processors.replicator import Replicator, _Healing, replication_group, site_transfer
from tests.fault.whole import assert_whole
from tests.grid import committed_lag, dc_serves, wait_for
from tests.integration.test_ingest_grid import c_store, events_for

pytestmark = [pytest.mark.cluster, pytest.mark.fault]

PAYLOAD_BYTES = 24_000_000
THROTTLE_MB_S = 4


def _cli(grid, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(grid.config_file), *args],
                          capture_output=True, text=True, timeout=300)


def _service(grid, name: str):
    return next(s for s in grid.supervisor.services() if s.name == name)


class Worker:
    """A replication worker of site B run by the test: ``dicomgrid serve replicator`` with a config of its own."""

    def __init__(self, config_file: Path, log: Path) -> None:
        self.config_file, self.log = config_file, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicomgrid", "--config", str(self.config_file), "serve", "replicator",
                 "--site", "B"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def own_b_worker(grid, tmp_path: Path) -> Iterator[tuple[Worker, Worker]]:
    """(a throttled worker, an unthrottled one) for site B, with the grid's own B worker stopped meanwhile."""
    grid.supervisor.stop_service(_service(grid, "B/replicator"), 30)
    base = grid.config_file.read_text()
    throttled = tmp_path / "throttled.toml"
    throttled.write_text(base + f"\n[replication]\nbandwidth_mb_s = {THROTTLE_MB_S}\n")
    workers = Worker(throttled, tmp_path / "worker.log"), Worker(grid.config_file, tmp_path / "worker.log")
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()
        grid.supervisor.up(timeout=90)


def test_a_worker_killed_mid_transfer_resumes_and_finishes_once_byte_identical(grid, own_b_worker, taps):
    throttled, plain = own_b_worker
    stored_tap, copy_tap, audit_tap = taps(), taps(schemas.TOPIC_REPLICA_STORED), taps(schemas.TOPIC_AUDIT)
    b_blobs = BlobStore(grid.config.site_storage("B"), "B")
    throttled.start()
    ds = make_instance()
    ds.Rows, ds.Columns = 2000, PAYLOAD_BYTES // 4000
    ds.PixelData = os.urandom(PAYLOAD_BYTES)
    assert c_store(grid.site("A"), [ds]) == [0]
    (event,) = events_for(stored_tap, [ds.SOPInstanceUID])
    digest, size = event["payload"]["sha256"], event["payload"]["size"]
    partial = b_blobs.root / "tmp" / f"{digest}.resume"

    # Killed a few megabytes in (the throttle makes the transfer last several seconds).
    wait_for(lambda: partial.exists() and partial.stat().st_size > 3 * THROTTLE_MB_S * 1_000_000 // 4,
             timeout=60, interval=0.1)
    throttled.kill()
    kept = partial.stat().st_size
    assert 0 < kept < size and not b_blobs.exists(digest)

    plain.start()
    (made,) = [e for e in copy_tap.collect(lambda seen: any(e["replica"]["sha256"] == digest for e in seen),
                                           timeout=90) if e["replica"]["sha256"] == digest]
    assert made["replica"]["site"] == "B" and made["replica"]["size"] == size
    a_blobs = BlobStore(grid.config.site_storage("A"), "A")
    assert b_blobs.verify(digest)
    assert b_blobs.path(digest).read_bytes() == a_blobs.path(digest).read_bytes()
    assert not partial.exists()

    # The second transfer asked site A only for what was missing (Range from the kept bytes).
    def resumed(seen):
        return [r for r in seen if r["site"] == "A" and r["outcome"] == 0 and any(
            o["type"] == "payload" and o["id"] == digest and o.get("detail", {}).get("offset", 0) > 0
            for o in r["objects"])]

    (served,) = resumed(audit_tap.collect(lambda seen: bool(resumed(seen)), timeout=30))
    detail = next(o["detail"] for o in served["objects"] if o["type"] == "payload")
    assert detail["offset"] >= kept and detail["offset"] + detail["bytes_sent"] == size

    wait_for(lambda: committed_lag(grid.config, schemas.TOPIC_REPLICATION_REQUESTED,
                                   replication_group(grid.config, "B")) == 0, timeout=60, interval=0.5)
    copy_tap.catch_up()
    assert [e["replica"]["sha256"] for e in copy_tap.seen].count(digest) == 1
    db = Cassandra(grid.config, local_dc="dc2")
    try:
        assert [r.site for r in ReplicaLedger(db).replicas(digest)].count("B") == 1
    finally:
        db.close()
    assert_whole(grid, [ds])


def test_a_source_endpoint_killed_in_the_middle_of_a_batch_leaves_each_copy_made_once_and_whole(
        grid, own_b_worker, taps):
    """B's worker fetches a backlog of ~0.5 MB instances in batch transfers (throttled, so they last a
    few seconds) when A's HTTP service is killed (SIGKILL, the supervisor restarts it): the copies that
    came whole are kept, the cut ones leave nothing behind, and every payload reaches B exactly once,
    byte-identical, fetched again on its own once A serves."""
    throttled, _ = own_b_worker
    stored_tap, copy_tap = taps(), taps(schemas.TOPIC_REPLICA_STORED)
    instances = []
    for _ in range(24):
        ds = make_instance()
        ds.Rows, ds.Columns = 500, 500
        ds.PixelData = os.urandom(500 * 500 * 2)  # under a batch's 1 MiB a payload
        instances.append(ds)
    assert c_store(grid.site("A"), instances) == [0] * len(instances)
    digests = {e["payload"]["sha256"] for e in events_for(stored_tap, [ds.SOPInstanceUID for ds in instances])}
    b_blobs, a_blobs = BlobStore(grid.config.site_storage("B"), "B"), BlobStore(grid.config.site_storage("A"), "A")
    http = next(s for s in grid.supervisor.status() if s.service.name == "A/http")

    throttled.start()
    wait_for(lambda: digests & set(b_blobs.digests()), timeout=90, interval=0.05)
    os.kill(http.pid, signal.SIGKILL)
    assert len(digests & set(b_blobs.digests())) < len(digests), "the batches ended before the kill"

    def copied(seen: list[dict]) -> set[str]:
        return {e["replica"]["sha256"] for e in seen if e["replica"]["site"] == "B"} & digests

    copy_tap.collect(lambda seen: copied(seen) == digests, timeout=180)
    wait_for(lambda: committed_lag(grid.config, schemas.TOPIC_REPLICATION_REQUESTED,
                                   replication_group(grid.config, "B")) == 0, timeout=60, interval=0.5)
    copy_tap.catch_up()
    announced = Counter(e["replica"]["sha256"] for e in copy_tap.seen if e["replica"]["site"] == "B")
    assert {announced[d] for d in digests} == {1}
    for digest in digests:
        assert b_blobs.verify(digest)
        assert b_blobs.path(digest).read_bytes() == a_blobs.path(digest).read_bytes()
    assert not [p for p in (b_blobs.root / "tmp").iterdir() if p.is_file() and p.name.startswith(tuple(digests))]
    # The supervisor restarted the endpoint (it served the single fetches); its health probe may lag.
    wait_for(lambda: (s := next(s for s in grid.supervisor.status() if s.service.name == "A/http")).healthy
             and s.pid != http.pid, timeout=60, interval=0.2)
    db = Cassandra(grid.config, local_dc="dc2")
    try:
        ledger = ReplicaLedger(db)
        assert all([r.site for r in ledger.replicas(d)].count("B") == 1 for d in digests)
    finally:
        db.close()
    assert_whole(grid, instances)


def test_a_source_site_gone_dark_ends_in_replication_failed_after_the_retries(grid, own_b_worker, taps):
    _, plain = own_b_worker
    failed_tap, stored_tap = taps(schemas.TOPIC_REPLICATION_FAILED), taps()
    plain.start()
    # A's receiver still takes the instance; nobody can fetch it from A.
    grid.supervisor.stop_service(_service(grid, "A/http"), 30)
    try:
        ds = make_instance()
        assert c_store(grid.site("A"), [ds]) == [0]
        (event,) = events_for(stored_tap, [ds.SOPInstanceUID])
        digest = event["payload"]["sha256"]
        (failure,) = [f for f in failed_tap.collect(
            lambda seen: any(f["source"]["sha256"] == digest for f in seen), timeout=120)
            if f["source"]["sha256"] == digest]
    finally:
        grid.supervisor.up(timeout=90)
    schemas.validate_event(schemas.TOPIC_REPLICATION_FAILED, failure)
    assert failure["target_site"] == "B" and failure["retryable"] is True
    assert failure["attempt"] == grid.config.replication.max_attempts
    assert "A:" in failure["reason"]
    assert not BlobStore(grid.config.site_storage("B"), "B").exists(digest)
    status = _cli(grid, "replication", "status", "--json")
    assert status.returncode == 0, status.stderr
    b = next(s for s in json.loads(status.stdout)["sites"] if s["site"] == "B")
    assert b["failed"] >= 1 and json.loads(status.stdout)["under_replicated"] >= 1

    # Once A serves again, anti-entropy asks B's worker for the copy it never got.
    repaired = _cli(grid, "repair", "--site", "B", "--json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert json.loads(repaired.stdout)[0]["requested"] >= 1
    assert_whole(grid, [ds])


def _spooled(path: Path) -> list[dict]:
    """The records in a replication worker's audit spool file (a line cut by the kill is left out)."""
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def _instances(record: dict) -> list[str]:
    return [o["id"] for o in record.get("objects", ()) if o["type"] == "instance"]


def test_a_worker_killed_while_it_holds_copies_audit_records_leaves_each_copy_audited_once(grid, own_b_worker, taps):
    """B's worker audits a first batch of copies (collected record confirmed), holds the records of a
    second batch, and is killed (SIGKILL) before it publishes theirs. The next worker adopts its spool:
    every copy is named in B's replication audit records once, the confirmed ones not again."""
    # The first worker is the throttled one: the payloads are a few KB, the cap changes nothing.
    first, second = own_b_worker
    stored_tap, audit_tap = taps(), taps(schemas.TOPIC_AUDIT)
    spool = grid.config.site_storage("B") / "audit-spool"
    studies = [generate_uid(), generate_uid()]
    batches = [[make_instance(study_uid=study) for _ in range(3)] for study in studies]
    wanted = {ds.SOPInstanceUID for batch in batches for ds in batch}

    def fetched(records: list[dict]) -> list[dict]:
        return [r for r in records if r["site"] == "B" and r["event"] == "DICOM Instances Transferred"
                and r["action"] == "C" and set(_instances(r)) & wanted]

    first.start()
    assert first.process is not None
    (own,) = wait_for(lambda: list(spool.glob(f"{first.process.pid}-*.jsonl")), timeout=60)
    assert c_store(grid.site("A"), batches[0]) == [0] * 3
    events_for(stored_tap, [ds.SOPInstanceUID for ds in batches[0]])
    audit_tap.collect(lambda seen: {ds.SOPInstanceUID for ds in batches[0]} <= set(
        uid for r in fetched(seen) for uid in _instances(r)), timeout=120)

    held = {ds.SOPInstanceUID for ds in batches[1]}
    assert c_store(grid.site("A"), batches[1]) == [0] * 3

    def holding() -> bool:
        named = [uid for r in _spooled(own) for uid in _instances(r)]
        return held <= set(named)

    wait_for(holding, timeout=60, interval=0.05)
    first.kill()
    # Killed within the hold window: each of the second batch's copies is in the spool on its own
    # record, and no record covering them was written.
    left = [r for r in _spooled(own) if set(_instances(r)) & held]
    assert sorted(uid for r in left for uid in _instances(r)) == sorted(held), \
        f"killed later than {MAX_HOLD_S}s after the first copy: a collected record was already written"
    assert not [r for r in fetched(audit_tap.catch_up()) if set(_instances(r)) & held]

    second.start()
    # Adopted and sent: a spool file whose records are all confirmed is removed.
    wait_for(lambda: not own.exists(), timeout=120, interval=0.5)
    audit_tap.collect(lambda seen: wanted <= {uid for r in fetched(seen) for uid in _instances(r)}, timeout=30)
    # A stopping worker publishes whatever it still collects: after that nothing more can come.
    second.stop()
    # A record may reach Kafka twice (at-least-once); the audit chain keeps it once, by its event ID.
    records = {r["event_id"]: r for r in fetched(audit_tap.catch_up())}.values()
    named = Counter(uid for r in records for uid in _instances(r) if uid in wanted)
    assert [{ds.SOPInstanceUID: named[ds.SOPInstanceUID] for ds in batch} for batch in batches] == [
        {ds.SOPInstanceUID: 1 for ds in batch} for batch in batches], "[confirmed before the kill, held at the kill]"
    for record in records:
        schemas.validate_event(schemas.TOPIC_AUDIT, record)
        assert record["outcome"] == 0
        assert {(p["user_id"], p["role"]) for p in record["participants"]} == {("A", "Source"), ("B", "Destination")}
    assert_whole(grid, [ds for batch in batches for ds in batch])


def test_an_anti_entropy_sweep_while_cassandra_cannot_answer_changes_nothing_and_the_next_one_heals(
        grid, own_b_worker, taps, tmp_path: Path):
    """Site B lacks a copy (its worker is stopped) when its datacenter goes down: the worker's background
    sweep fails with a warning, requests nothing and stays due; once dc2 answers, the next one requests
    the copy and the worker makes it."""
    _, plain = own_b_worker
    stored_tap, request_tap = taps(), taps(schemas.TOPIC_REPLICATION_REQUESTED)
    ds = make_instance()
    assert c_store(grid.site("A"), [ds]) == [0]
    (event,) = events_for(stored_tap, [ds.SOPInstanceUID])
    digest = event["payload"]["sha256"]

    def requested(seen: list[dict]) -> list[dict]:
        return [r for r in seen if r["source"]["sha256"] == digest and r["target_site"] == "B"]

    (fan_out,) = requested(request_tap.collect(lambda seen: bool(requested(seen)), timeout=60))
    # With the shipped remote_dc_failover_hosts, B would read through dc1 and the sweep not notice dc2
    # going: here B stays in its datacenter, so its ledger cannot answer without dc2.
    cassandra = grid.config.cassandra.model_copy(update={"remote_dc_failover_hosts": 0})
    site = open_site(grid.config.model_copy(update={"cassandra": cassandra}), "B", "test-sweep")
    worker = Replicator(site, site_transfer(site))
    # The schedule state of the test's own: the session's B worker keeps its own.
    healing = _Healing(grid.config.model_copy(update={"data_dir": tmp_path}), "B")
    healing.sweep.done(now=0.0)  # a sweep is due
    b_blobs = BlobStore(grid.config.site_storage("B"), "B")
    local = LocalCluster(grid.config)
    try:
        wait_for(lambda: site.ledger.verified_sites(digest) == {"A"}, timeout=60)
        held = set(b_blobs.digests())
        assert digest not in held
        local.stop_node("cassandra-dc2")
        try:
            # Stopped means every thread of the JVM is gone, its ports too: up() would otherwise take
            # them for another process's and refuse to start the node.
            ports = CassandraNode(grid.config, 2).listen_addresses()
            assert all(listener_pid(host, port) is None for host, port in ports)
            with capture_logs() as logged:
                asyncio.run(healing.maybe_run(worker))
            (warning,) = [e for e in logged if e["event"].startswith("background healing stopped")]
            assert warning["log_level"] == "warning" and warning["error"]
            assert healing.sweep.due() and healing.sweep.last_done() == 0.0
            assert not [e for e in logged if e["event"] == "anti-entropy sweep"]
            assert requested(request_tap.catch_up()) == [fan_out]
            assert set(b_blobs.digests()) == held
        finally:
            local.up()
            wait_for(lambda: dc_serves(grid.config, "dc2"), timeout=120, interval=0.5)

        def answers() -> bool:
            try:
                return site.ledger.verified_sites(digest) == {"A"}
            except (DriverException, NoHostAvailable, OSError):
                return False

        # The ledger is as it was: the failed sweep marked no copy, and none was made meanwhile.
        wait_for(answers, timeout=120, interval=1)
        assert set(b_blobs.digests()) == held
        with capture_logs() as logged:
            asyncio.run(healing.maybe_run(worker))
        assert not [e for e in logged if e["log_level"] in ("warning", "error") and "healing" in e["event"]]
        (report,) = [e for e in logged if e["event"] == "anti-entropy sweep"]
        assert report["site"] == "B" and report["requested"] >= 1
        assert not healing.sweep.due()
        (_, again) = requested(request_tap.collect(lambda seen: len(requested(seen)) == 2, timeout=30))
        schemas.validate_event(schemas.TOPIC_REPLICATION_REQUESTED, again)
        assert again["source"]["site"] == "A" and again["event_id"] != fan_out["event_id"]
    finally:
        healing._thread.shutdown()
        worker.transfer.close()
        site.close()
    plain.start()
    assert_whole(grid, [ds])


def test_a_batch_whose_ledger_rows_cannot_be_written_is_settled_again_once_cassandra_answers(
        grid, own_b_worker, taps):
    """B's worker fetches a batch of copies from A and has their events confirmed when B's datacenter
    stops (the ledger rows cannot be written): the batch fails as a whole (its actor holds the offsets),
    the copies stay durable and whole, nothing is left in tmp. Once dc2 answers, the same requests are
    settled again: each copy is found held, recorded in the ledger once and audited once."""
    _, plain = own_b_worker
    stored_tap, copy_tap, audit_tap = taps(), taps(schemas.TOPIC_REPLICA_STORED), taps(schemas.TOPIC_AUDIT)
    request_tap = taps(schemas.TOPIC_REPLICATION_REQUESTED)
    instances = [make_instance() for _ in range(6)]
    assert c_store(grid.site("A"), instances) == [0] * len(instances)
    digests = {e["payload"]["sha256"] for e in events_for(stored_tap, [ds.SOPInstanceUID for ds in instances])}

    def for_b(seen: list[dict]) -> list[dict]:
        return [r for r in seen if r["source"]["sha256"] in digests and r["target_site"] == "B"]

    requests = for_b(request_tap.collect(lambda seen: len(for_b(seen)) == len(digests), timeout=60))
    # B stays in its datacenter (see the anti-entropy test): through dc1 its ledger would still answer.
    cassandra = grid.config.cassandra.model_copy(update={"remote_dc_failover_hosts": 0})
    site = open_site(grid.config.model_copy(update={"cassandra": cassandra}), "B", "test-batch")
    worker = Replicator(site, site_transfer(site))
    b_blobs, a_blobs = BlobStore(grid.config.site_storage("B"), "B"), BlobStore(grid.config.site_storage("A"), "A")
    local = LocalCluster(grid.config)

    def copied_by_b(seen: list[dict]) -> Counter:
        return Counter(e["replica"]["sha256"] for e in seen if e["replica"]["site"] == "B"
                       and e["replica"]["sha256"] in digests)

    uids = {ds.SOPInstanceUID for ds in instances}

    def audited(seen: list[dict]) -> Counter:
        records = {r["event_id"]: r for r in seen if r["site"] == "B"
                   and r["event"] == "DICOM Instances Transferred" and r["action"] == "C"}.values()
        return Counter(uid for r in records for uid in _instances(r) if uid in uids)

    try:
        # Connected and its statements prepared while dc2 answers, as a running worker's are.
        assert site.ledger.verified_sites_of(sorted(digests)) == {d: {"A"} for d in digests}
        local.stop_node("cassandra-dc2")
        try:
            with pytest.raises((DriverException, NoHostAvailable)):
                worker.handle_batch(requests)
            assert digests <= set(b_blobs.digests())
            assert not [p for p in (b_blobs.root / "tmp").iterdir() if p.name.startswith(tuple(digests))]
            # The events went out before the rows: a copy is announced, never recorded unannounced.
            announced = copy_tap.collect(lambda seen: set(copied_by_b(seen)) == digests, timeout=30)
            assert set(copied_by_b(announced)) == digests
        finally:
            local.up()
            wait_for(lambda: dc_serves(grid.config, "dc2"), timeout=120, interval=0.5)

        def answers() -> bool:
            try:
                return site.ledger.verified_sites_of(sorted(digests)) == {d: {"A"} for d in digests}
            except (DriverException, NoHostAvailable, OSError):
                return False

        # The failed round wrote no row.
        wait_for(answers, timeout=120, interval=1)
        done = worker.handle_batch(requests)
        assert sorted(d.value for _, d in done) == ["already held"] * len(digests)
        site.audit.flush()
        assert set(audited(audit_tap.collect(lambda seen: set(audited(seen)) == uids, timeout=60))) == uids
    finally:
        worker.transfer.close()
        site.close()
    for digest in digests:
        assert b_blobs.path(digest).read_bytes() == a_blobs.path(digest).read_bytes()
    db = Cassandra(grid.config, local_dc="dc2")
    try:
        ledger = ReplicaLedger(db)
        assert all([r.site for r in ledger.replicas(d) if r.verified_at is not None].count("B") == 1 for d in digests)
    finally:
        db.close()
    # The session's worker is started again: it finds every request held and changes nothing.
    plain.start()
    wait_for(lambda: committed_lag(grid.config, schemas.TOPIC_REPLICATION_REQUESTED,
                                   replication_group(grid.config, "B")) == 0, timeout=90, interval=0.5)
    assert set(audited(audit_tap.catch_up()).values()) == {1}
    # Announced by the failed round, and again by the round that recorded it (at-least-once: the event
    # always precedes the row), never by the worker that found it recorded.
    assert set(copied_by_b(copy_tap.catch_up()).values()) == {2}
    assert_whole(grid, instances)

"""Storage Commitment at a site of the running test grid, with a pynetdicom requestor that listens for
its reports as the test config's COMMITSCU (a second one, DEADSCU, is listed where nothing listens).

The test grid waits ``timeout_s`` = 10 s for copies, ``unknown_grace_s`` = 1.5 s for unknown
instances, and tries a report 3 times with short backoff (tests/grid.py).
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from dicomgrid import schemas
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.commitments import REPORTED, UNDELIVERABLE, TransactionStore
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.ledger import ReplicaLedger
from tests.dicom_samples import make_instance
from tests.grid import COMMIT_SCU, UNREACHABLE_SCU, wait_for

pytestmark = [pytest.mark.cluster]

AUDIT_EVENT = "Storage Commitment"


@dataclass
class Report:
    event_type: int
    info: Dataset
    calling_ae: str
    roles: tuple[bool, bool]  # (as SCU, as SCP) of the listening requestor on the report's association
    received_at: float  # monotonic
    received_utc: dt.datetime


@dataclass
class Requested:
    status: int
    comment: str | None
    transaction_uid: str
    sent_at: float


@dataclass
class Requestor:
    """A Storage Commitment SCU: sends N-ACTION to a site, receives N-EVENT-REPORTs on its own port."""

    title: str
    port: int
    reports: "queue.Queue[Report]" = field(default_factory=queue.Queue)
    seen: list[Report] = field(default_factory=list)

    def listen(self) -> object:
        ae = AE(ae_title=self.title)
        # The grid opens the report's association as the SCP of the SOP class; accept that role.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        return ae.start_server(("127.0.0.1", self.port), block=False,
                               evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])

    def _on_report(self, event: evt.Event) -> tuple[int, None]:
        cx = next(c for c in event.assoc.accepted_contexts if c.abstract_syntax == StorageCommitmentPushModel)
        self.reports.put(Report(event.event_type, event.event_information, event.assoc.requestor.ae_title,
                                (cx.as_scu, cx.as_scp), time.monotonic(), dt.datetime.now(dt.timezone.utc)))
        return 0x0000, None

    def request(self, site, refs: Sequence[tuple[str, str]], transaction_uid: str | None = None,
                calling_ae: str | None = None) -> Requested:
        ds = Dataset()
        ds.TransactionUID = transaction_uid or generate_uid()
        items = []
        for sop_class, sop_instance in refs:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
            items.append(item)
        ds.ReferencedSOPSequence = items
        ae = AE(ae_title=calling_ae or self.title)
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
        assert assoc.is_established
        try:
            sent_at = time.monotonic()
            status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        finally:
            # The report must not depend on this association: it is gone before the report is due.
            assoc.release()
        return Requested(status.Status, status.get("ErrorComment"), ds.TransactionUID, sent_at)

    def report_for(self, transaction_uid: str, timeout: float = 30.0) -> Report:
        deadline = time.monotonic() + timeout
        while True:
            for report in self.seen:
                if report.info.TransactionUID == transaction_uid:
                    return report
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no report for {transaction_uid} within {timeout}s"
            try:
                self.seen.append(self.reports.get(timeout=remaining))
            except queue.Empty:
                pass


@pytest.fixture(scope="module")
def requestor(grid) -> Iterator[Requestor]:
    peer = grid.config.remote_aes[COMMIT_SCU]
    scu = Requestor(COMMIT_SCU, peer.port)
    server = scu.listen()
    yield scu
    server.shutdown()  # type: ignore[attr-defined]


@pytest.fixture
def db(grid) -> Iterator[Cassandra]:
    db = Cassandra(grid.config, local_dc="dc1")
    yield db
    db.close()


def c_store(site, datasets: Sequence[Dataset]) -> None:
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = [build_context(CTImageStorage)]
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established
    try:
        assert [assoc.send_c_store(ds).Status for ds in datasets] == [0] * len(datasets)
    finally:
        assoc.release()


def stored_at_a(grid, count: int) -> list[Dataset]:
    study = generate_uid()
    datasets = [make_instance(study_uid=study, InstanceNumber=n, patient_id="SC-TEST") for n in range(count)]
    c_store(grid.site("A"), datasets)
    return datasets


def refs(datasets: Sequence[Dataset]) -> list[tuple[str, str]]:
    return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets]


@contextmanager
def replication_paused(grid, site: str = "B") -> Iterator[None]:
    """Site ``site``'s replication worker frozen (SIGSTOP), so what A stores stays at one copy meanwhile.

    Frozen rather than stopped: on SIGCONT it carries on at once, without a restart and a consumer-group
    rebalance, and copies what was asked of it in the meantime.
    """
    service = next(s for s in grid.supervisor.services() if s.site == site and s.kind == "replicator")
    pid = grid.supervisor.daemon(service).pid()
    assert pid is not None, f"{service.name} is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def sequence(report: Report, keyword: str) -> list[tuple]:
    items = report.info.get(keyword) or []
    if keyword == "FailedSOPSequence":
        return [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID, i.FailureReason) for i in items]
    return [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in items]


def audits_of(tap, transaction_uid: str, count: int, timeout: float = 20.0) -> list[dict]:
    def matching(seen: list[dict]) -> list[dict]:
        return [r for r in seen if r["event"] == AUDIT_EVENT and transaction_uid in r["outcome_description"]]

    return matching(tap.collect(lambda seen: len(matching(seen)) >= count, timeout=timeout))


def transaction(grid, db: Cassandra, uid: str):
    return TransactionStore(db, grid.config.name, "A", "test-reader", 1.0).load(uid)


def test_replicated_instances_are_committed_on_a_new_association_with_the_scp_role(grid, requestor, db, taps):
    tap = taps(schemas.TOPIC_AUDIT)
    datasets = stored_at_a(grid, 3)
    asked = requestor.request(grid.site("A"), refs(datasets))
    assert asked.status == 0x0000

    # Asked right after the C-STORE responses: the report waits for B's replication worker.
    report = requestor.report_for(asked.transaction_uid)
    assert report.event_type == 1
    ledger, index = ReplicaLedger(db), IndexReader(db)
    for ds in datasets:
        copies = {r.site: r for r in ledger.replicas(index.instance_location(str(ds.SOPInstanceUID)).sha256)}
        assert set(copies) == {"A", "B"}
        # B's copy was verified before the report said "committed".
        assert copies["B"].verified_at.replace(tzinfo=dt.timezone.utc) <= report.received_utc
    assert sequence(report, "ReferencedSOPSequence") == refs(datasets)
    assert "FailedSOPSequence" not in report.info and report.info.RetrieveAETitle == "GRID_A"
    # A new association from the site's AE, on which the grid is the SCP and the requestor the SCU.
    assert report.calling_ae == "GRID_A" and report.roles == (True, False)
    print(f"\nN-ACTION -> N-EVENT-REPORT: {report.received_at - asked.sent_at:.3f} s")

    row = wait_for(lambda: (t := transaction(grid, db, asked.transaction_uid)) and t.state == REPORTED and t)
    assert row.report_attempts == 1 and row.requestor_ae == COMMIT_SCU
    records = audits_of(tap, asked.transaction_uid, 2)
    assert [(r["outcome"], r["outcome_description"].split(",")[0]) for r in records] == [
        (0, "N-ACTION accepted"), (0, "N-EVENT-REPORT delivered")
    ]
    assert {o["id"] for o in records[1]["objects"]} == {ds.SOPInstanceUID for ds in datasets}


def test_an_unknown_instance_fails_without_waiting_for_the_timeout(grid, requestor):
    unknown = (str(CTImageStorage), generate_uid())
    asked = requestor.request(grid.site("A"), [unknown])
    assert asked.status == 0x0000
    report = requestor.report_for(asked.transaction_uid)
    assert report.event_type == 2
    assert sequence(report, "FailedSOPSequence") == [(*unknown, 0x0112)]
    waited = report.received_at - asked.sent_at
    settings = grid.config.storage_commitment
    assert settings.unknown_grace_s <= waited < settings.timeout_s


def test_a_mixed_result_names_each_failure_with_its_reason(grid, requestor, db):
    good, wrong_class = stored_at_a(grid, 2)
    unknown = (str(CTImageStorage), generate_uid())
    asked = requestor.request(
        grid.site("A"), [refs([good])[0], unknown, (str(MRImageStorage), str(wrong_class.SOPInstanceUID))]
    )
    report = requestor.report_for(asked.transaction_uid)
    assert report.event_type == 2
    assert sequence(report, "ReferencedSOPSequence") == refs([good])
    assert sequence(report, "FailedSOPSequence") == [
        (*unknown, 0x0112), (str(MRImageStorage), str(wrong_class.SOPInstanceUID), 0x0119)
    ]
    assert report.received_at - asked.sent_at < grid.config.storage_commitment.timeout_s


def test_an_instance_short_of_copies_fails_with_0110_after_the_timeout(grid, requestor):
    with replication_paused(grid):
        # Held at A only while B cannot copy it: with min_copies = 2 it cannot be committed.
        (only_at_a,) = stored_at_a(grid, 1)
        asked = requestor.request(grid.site("A"), refs([only_at_a]))
        report = requestor.report_for(asked.transaction_uid, timeout=40)
    assert report.event_type == 2
    assert sequence(report, "FailedSOPSequence") == [(*refs([only_at_a])[0], 0x0110)]
    assert report.received_at - asked.sent_at >= grid.config.storage_commitment.timeout_s


def test_an_unreachable_requestor_is_tried_report_attempts_times_then_audited(grid, requestor, db, taps):
    tap = taps(schemas.TOPIC_AUDIT)
    asked = requestor.request(grid.site("A"), [(str(CTImageStorage), generate_uid())], calling_ae=UNREACHABLE_SCU)
    assert asked.status == 0x0000
    records = audits_of(tap, asked.transaction_uid, 2, timeout=30)
    attempts = grid.config.storage_commitment.report_attempts
    assert records[1]["outcome"] == 8
    assert f"not delivered after {attempts} attempt(s)" in records[1]["outcome_description"]
    assert any(p["ae_title"] == UNREACHABLE_SCU and p["role"] == "Destination" for p in records[1]["participants"])
    row = wait_for(lambda: (t := transaction(grid, db, asked.transaction_uid)) and t.state == UNDELIVERABLE and t)
    assert row.report_attempts == attempts and "no association" in row.note


def test_a_requestor_without_an_address_is_refused_at_once(grid, requestor, taps):
    tap = taps(schemas.TOPIC_AUDIT)
    # STORESCU may associate, but the grid lists no address where a report could reach it.
    asked = requestor.request(grid.site("A"), [(str(CTImageStorage), generate_uid())], calling_ae="STORESCU")
    assert asked.status == 0x0110 and "remote_aes" in asked.comment
    (record,) = tap.collect(lambda seen: any(r["event"] == AUDIT_EVENT and r["outcome"] == 4 and any(
        p["ae_title"] == "STORESCU" for p in r["participants"]) for r in seen), timeout=15)[-1:]
    assert record["outcome_description"].startswith("N-ACTION refused with 0x0110")


def _receiver(grid, site: str):
    return next(s for s in grid.supervisor.services() if s.site == site and s.kind == "receiver")


def test_a_transaction_survives_a_killed_receiver_and_is_reported_once(grid, requestor, db):
    with replication_paused(grid):
        datasets = stored_at_a(grid, 2)
        asked = requestor.request(grid.site("A"), refs(datasets))
        assert asked.status == 0x0000

        daemon = grid.supervisor.daemon(_receiver(grid, "A"))
        pid = daemon.pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: daemon.pid() is None, timeout=10, interval=0.1)
        before = transaction(grid, db, asked.transaction_uid)
        assert before.state == "pending" and before.owner.split(":")[1] == str(pid)

        grid.supervisor.up(timeout=60)
        # The restarted receiver finds the transaction and takes it over once the dead one's lease is out.
        wait_for(lambda: transaction(grid, db, asked.transaction_uid).owner != before.owner, timeout=15,
                 interval=0.1)
        print(f"\nreceiver killed and restarted, transaction taken over after {time.monotonic() - asked.sent_at:.1f} s")
    # B copies the instances now, within the transaction's deadline.
    report = requestor.report_for(asked.transaction_uid, timeout=30)
    assert report.event_type == 1 and sequence(report, "ReferencedSOPSequence") == refs(datasets)
    after = wait_for(lambda: (t := transaction(grid, db, asked.transaction_uid)) and t.state == REPORTED and t)
    assert after.owner != before.owner and after.report_attempts == 1
    # Only one report for it, however long one waits.
    time.sleep(2 * grid.config.storage_commitment.lease_s)
    while not requestor.reports.empty():
        requestor.seen.append(requestor.reports.get())
    assert sum(r.info.TransactionUID == asked.transaction_uid for r in requestor.seen) == 1

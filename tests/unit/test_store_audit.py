"""The audit of an association's stores in one record (producers.store_audit), over a real audit spool:
the held per-instance records are forgotten only once the collected record is confirmed, and a receiver
killed before then leaves them to be sent by the next process."""

from __future__ import annotations

import subprocess
import sys
import time

from concurrent.futures import Future
from pathlib import Path

import pytest
from lxml import etree

from dicomgrid import schemas
from dicomgrid.core import audit
from dicomgrid.core.audit import SUCCESS, AuditObject, AuditTrail, Participant, patient_object, to_xml
from dicomgrid.core.audit_codes import EVENT_TYPES
from dicomgrid.core.audit_spool import AuditSpool
from dicomgrid.core.events import Source
from dicomgrid.core import transfer_audit
from dicomgrid.core.transfer_audit import TransferAudit, TransferAudits
from dicomgrid.producers.store_audit import StoreAudit
from dicomgrid.core.config import LimitsConfig
from tests.dicom_samples import make_instance, to_part10
from tests.unit.test_ingest import FakePublisher
from tests.unit.test_stow_limits import CONTENT_TYPE, body
from tests.unit.test_stow_limits import site as stow_site  # noqa: F401 (a fixture)

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
CT = "1.2.840.10008.5.1.4.1.1.2"
SOURCE = Source("DIMSE", "STORESCU", "GRID_A", "127.0.0.1:40123")


class HeldPublisher:
    """Delivery reports come when the test says so."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict, Future]] = []

    def publish(self, topic: str, key: str, event: dict) -> Future:
        future: Future = Future()
        self.sent.append((event, future))
        return future

    def flush(self, timeout: float = 0) -> int:
        return sum(not f.done() for _, f in self.sent)

    def close(self, timeout: float = 0) -> None:
        pass


def _add(batch: StoreAudit, n: int, study: str = "1.2.3", duplicate: bool = False) -> str:
    uid = f"{study}.{n}"
    objects = [*patient_object("PAT-7", "Doe^John"), AuditObject("study", study),
               AuditObject("instance", uid, {"sop_class_uid": CT})]
    batch.add(study_uid=study, sop_instance_uid=uid, sop_class_uid=CT, patient=("PAT-7", "Doe^John"),
              duplicate=duplicate, description=f"DIMSE stored: payload {n}", objects=objects)
    return uid


def _valid(record: dict) -> None:
    schemas.validate_event(schemas.TOPIC_AUDIT, record)
    validator = schemas.audit_message_schema()
    assert validator.validate(etree.fromstring(to_xml(record))), validator.error_log


def test_one_record_names_every_instance_and_the_held_ones_go_once_it_is_confirmed(tmp_path: Path):
    spool = AuditSpool(tmp_path)
    publisher = HeldPublisher()
    trail = AuditTrail("A", publisher, spool=spool)  # type: ignore[arg-type]
    batch = StoreAudit(trail, "A", SOURCE)
    uids = [_add(batch, n) for n in range(3)] + [_add(batch, 9, study="1.2.4", duplicate=True)]
    assert publisher.sent == [] and spool.pending() == 4  # held: on disk, not published

    batch.flush()
    ((record, future),) = publisher.sent
    _valid(record)
    assert record["outcome"] == SUCCESS and record["action"] == "C"
    assert record["outcome_description"] == "DIMSE stored: 4 instances (1 already stored, identical bytes)"
    assert [o["id"] for o in record["objects"] if o["type"] == "instance"] == uids
    assert {(o["id"], o["detail"]["instances"]) for o in record["objects"] if o["type"] == "study"} == {
        ("1.2.3", 3), ("1.2.4", 1)}
    assert {"type": "patient", "id": "PAT-7", "detail": {"name": "Doe^John"}} in record["objects"]
    assert [p["ae_title"] for p in record["participants"]] == ["STORESCU", "GRID_A"]
    # Not confirmed yet: the held records and the collected one all stay.
    assert spool.pending() == 5 and list(spool.undelivered()) == []

    future.set_result(None)
    assert spool.pending() == 0
    batch.flush()  # nothing left to send
    assert len(publisher.sent) == 1
    trail.close()


def test_a_refused_record_is_sent_again_and_the_held_ones_wait_for_it(tmp_path: Path):
    spool = AuditSpool(tmp_path)
    publisher = HeldPublisher()
    trail = AuditTrail("A", publisher, spool=spool)  # type: ignore[arg-type]
    trail._stop.set()  # the test does the resend loop's work itself
    batch = StoreAudit(trail, "A", SOURCE)
    _add(batch, 1)
    _add(batch, 2)
    batch.flush()
    (record, future), = publisher.sent
    future.set_exception(RuntimeError("broker down"))
    # Only the collected record is due again; the held ones are not sent on their own by a live process.
    ((token, again),) = list(spool.undelivered())
    assert again["event_id"] == record["event_id"] and spool.pending() == 3
    trail._send(again, token)
    publisher.sent[-1][1].set_result(None)
    assert spool.pending() == 0


def test_the_held_records_of_a_killed_receiver_are_adopted_and_sent_by_the_next(tmp_path: Path):
    """A real process holds three stores, then is killed (SIGKILL) before their record is published."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from pathlib import Path
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.audit_codes import EVENT_TYPES
from dicomgrid.core.audit_spool import AuditSpool
from dicomgrid.producers.store_audit import StoreAudit
from tests.unit.test_store_audit import SOURCE, _add
trail = AuditTrail("A", None, spool=AuditSpool(Path({str(tmp_path)!r})))
batch = StoreAudit(trail, "A", SOURCE)
for n in range(3):
    _add(batch, n)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    adopted = AuditSpool(tmp_path)
    due = [record for _, record in adopted.undelivered()]
    assert sorted(o["id"] for r in due for o in r["objects"] if o["type"] == "instance") == [
        "1.2.3.0", "1.2.3.1", "1.2.3.2"]
    for record in due:
        _valid(record)
        assert record["event"] == "DICOM Instances Transferred" and record["outcome"] == SUCCESS


def test_a_killed_receiver_leaves_only_what_was_not_confirmed_to_the_next(tmp_path: Path):
    """A real process has the record of three stores confirmed, holds two more, and is killed (SIGKILL):
    its spool file still has every line, but the next process sends only the two held records. Sent
    again, the three would name those instances twice (under event IDs of their own) in the trail."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from pathlib import Path
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.audit_spool import AuditSpool
from dicomgrid.producers.store_audit import StoreAudit
from tests.unit.test_ingest import FakePublisher
from tests.unit.test_store_audit import SOURCE, _add
spool = AuditSpool(Path({str(tmp_path)!r}))
trail = AuditTrail("A", FakePublisher(), spool=spool)
trail._stop.set()
batch = StoreAudit(trail, "A", SOURCE)
for n in range(3):
    _add(batch, n)
batch.flush()
assert spool.pending() == 0, spool.pending()
for n in range(3, 5):
    _add(batch, n)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    (left,) = tmp_path.glob("*.jsonl")
    assert sum('"event_id"' in line for line in left.read_text().splitlines()) == 6
    due = [record for _, record in AuditSpool(tmp_path).undelivered()]
    assert sorted(o["id"] for r in due for o in r["objects"] if o["type"] == "instance") == ["1.2.3.3", "1.2.3.4"]
    assert sorted(r["outcome_description"] for r in due) == ["DIMSE stored: payload 3", "DIMSE stored: payload 4"]


def test_stores_waiting_on_an_idle_association_are_sent_by_the_resend_loop(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(transfer_audit, "MAX_HOLD_S", 0.05)
    monkeypatch.setattr(audit, "RESEND_INTERVAL_S", 0.05)
    publisher = FakePublisher()
    spool = AuditSpool(tmp_path)
    trail = AuditTrail("A", publisher, spool=spool)  # type: ignore[arg-type]
    batch = StoreAudit(trail, "A", SOURCE)
    uid = _add(batch, 1)
    deadline = time.monotonic() + 5
    while not publisher.of(schemas.TOPIC_AUDIT) and time.monotonic() < deadline:
        time.sleep(0.02)
    (record,) = publisher.of(schemas.TOPIC_AUDIT)
    assert [o["id"] for o in record["objects"] if o["type"] == "instance"] == [uid]
    assert spool.pending() == 0 and len(batch) == 0
    trail.close()


def test_a_long_association_is_audited_every_max_instances(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(transfer_audit, "AUDIT_MAX_INSTANCES", 3)
    publisher = FakePublisher()
    trail = AuditTrail("A", publisher, spool=AuditSpool(tmp_path))  # type: ignore[arg-type]
    batch = StoreAudit(trail, "A", SOURCE)
    uids = [_add(batch, n) for n in range(7)]
    batch.flush()
    records = publisher.of(schemas.TOPIC_AUDIT)
    assert [[o["id"] for o in r["objects"] if o["type"] == "instance"] for r in records] == [
        uids[0:3], uids[3:6], uids[6:7]]
    trail.close()


def test_a_stow_request_is_audited_in_one_record(stow_site):
    client, publisher, _ = stow_site
    instances = [make_instance() for _ in range(3)]
    response = client(LimitsConfig()).post("/dicomweb/studies", content=body(*map(to_part10, instances)),
                                           headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 200, response.text
    (record,) = publisher.of(schemas.TOPIC_AUDIT)
    _valid(record)
    assert record["outcome_description"] == "STOW-RS stored: 3 instances"
    assert [o["id"] for o in record["objects"] if o["type"] == "instance"] == [i.SOPInstanceUID for i in instances]
    assert [t["code"] for t in record["event_type_codes"]] == [EVENT_TYPES["Store Instances over the Web"].code]


def test_the_trail_publishes_open_collections_when_it_is_flushed_at_shutdown(tmp_path: Path):
    """A service that stops publishes what its collectors hold (the replication worker's and the payload
    endpoint's peers, a still open association) rather than leaving it to the next process's adoption."""
    spool = AuditSpool(tmp_path)
    publisher = HeldPublisher()
    trail = AuditTrail("A", publisher, spool=spool)  # type: ignore[arg-type]
    trail._stop.set()  # no resend loop: only flush() may publish
    open_association = StoreAudit(trail, "A", SOURCE)
    uids = [_add(open_association, n) for n in range(2)]
    replicas = TransferAudits(lambda peer: TransferAudit(
        trail, [Participant(peer, False, None, None, "Source"), Participant("A", True, "GRID_A", None, "Destination")],
        f"replicas fetched from site {peer} and verified"))
    replicas["B"].add(study_uid="1.2.5", sop_instance_uid="1.2.5.1", sop_class_uid=CT, description="replica fetched",
                      objects=[AuditObject("instance", "1.2.5.1")])
    assert replicas["B"] is replicas["B"] and publisher.sent == []

    trail.flush()
    records = {r["outcome_description"]: r for r, _ in publisher.sent}
    assert set(records) == {"DIMSE stored: 2 instances", "replicas fetched from site B and verified: 1 instance"}
    for record in records.values():
        _valid(record)
    assert [o["id"] for o in records["DIMSE stored: 2 instances"]["objects"] if o["type"] == "instance"] == uids
    for _, future in publisher.sent:
        future.set_result(None)
    assert spool.pending() == 0

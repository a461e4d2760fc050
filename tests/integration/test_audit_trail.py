"""The audit trail on the real grid: every record the session produced is a valid DICOM audit message,
each site's records form a hash chain in Cassandra that `dicomgrid audit verify` checks, and `dicomgrid
audit query` answers who accessed a patient."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from lxml import etree

from dicomgrid import schemas
from dicomgrid.core.audit import to_xml
from dicomgrid.core.audit_log import AuditLog
from dicomgrid.core.cassandra import Cassandra
from tests.dicom_samples import make_instance
from tests.grid import wait_for, web
from tests.integration.test_ingest_grid import c_store, events_for

pytestmark = [pytest.mark.cluster]


def _cli(grid, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(grid.config_file), *args],
                          capture_output=True, text=True, timeout=120)


def _find(site, patient_id: str) -> list[int]:
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(FIND)
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", patient_id, ""
    try:
        return [status.Status for status, _ in assoc.send_c_find(query, FIND)]
    finally:
        assoc.release()


@pytest.fixture
def audit_log(grid):
    db = Cassandra(grid.config, local_dc="dc1")
    yield AuditLog(db)
    db.close()


def test_every_audit_record_is_a_valid_audit_message(grid, taps):
    """Each kind of event the grid audits, made here (and whatever earlier tests of the session made)."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage

    from tests.integration.test_ingest_grid import associate
    from tests.integration.test_retrieve import c_get, study_identifier, wado_study

    audit_tap = taps(schemas.TOPIC_AUDIT, from_start=True)
    ds = make_instance(patient_id="AUDIT-PAT-1")
    assert c_store(grid.site("A"), [ds]) == [0]  # a store, and its replication to B
    events_for(taps(), [ds.SOPInstanceUID])
    bad = make_instance()
    bad.StudyInstanceUID = "1.2.3.04"  # refused: invalid UID
    assert c_store(grid.site("A"), [bad]) == [0xC001]
    intruder = associate(grid.site("A"), calling_ae="INTRUDER")  # a refused association
    assert intruder.is_rejected
    base = f"http://127.0.0.1:{grid.site('B').http_port}/dicomweb"
    assert web.get(f"{base}/studies", params={"PatientID": "AUDIT-PAT-1"}).status_code == 200  # QIDO-RS
    _find(grid.site("A"), "AUDIT-PAT-1")  # C-FIND
    wait_for(lambda: wado_study(grid.site("B"), ds.StudyInstanceUID).status_code == 200, timeout=60)  # WADO-RS
    result = c_get(grid.site("A"), study_identifier(ds.StudyInstanceUID), {(CTImageStorage, ImplicitVRLittleEndian)})
    assert result.final.Status == 0x0000  # C-GET

    records = audit_tap.collect(lambda seen: sum(r["event"] == "DICOM Instances Transferred" and r["action"] == "R"
                                                 for r in seen) >= 3, timeout=60)
    validator = schemas.audit_message_schema()
    for record in records:
        schemas.validate_event(schemas.TOPIC_AUDIT, record)
        xml = etree.fromstring(to_xml(record))
        assert validator.validate(xml), (record["event"], validator.error_log)
    kinds = {(r["event"], r["event_code"]["code"], tuple(t["code"] for t in r["event_type_codes"])) for r in records}
    for expected in [("DICOM Instances Transferred", "110104", ("RAD-8",)), ("Query", "110112", ("RAD-14",)),
                     ("Security Alert", "110113", ("110126",)),
                     ("Begin Transferring DICOM Instances", "110102", ("RAD-16",)),
                     ("DICOM Instances Transferred", "110104", ("RAD-107",)),
                     ("Application Activity", "110100", ("110120",))]:
        assert expected in kinds, (expected, kinds)
    stored = [r for r in records if r["event"] == "DICOM Instances Transferred" and r["action"] == "C"
              and r["site"] == "A" and r["outcome_description"].startswith("DIMSE")
              and any(o["id"] == ds.SOPInstanceUID for o in r["objects"])]
    assert len(stored) == 1
    assert {"type": "patient", "id": "AUDIT-PAT-1", "detail": {"name": "Doe^Jane"}} in stored[0]["objects"]
    queried = [r for r in records if r["event"] == "Query" and any(o.get("id") == "AUDIT-PAT-1" for o in r["objects"])]
    assert {q["participants"][0]["role"] for q in queried} == {"Source"} and len(queried) == 2


def test_the_chain_verifies_and_names_a_changed_a_removed_and_a_moved_record(grid, audit_log):
    ds = make_instance(patient_id="AUDIT-PAT-2")
    assert c_store(grid.site("A"), [ds]) == [0]
    # The store's audit record is chained (and later ones too) once the builder has read it.
    wait_for(lambda: any(e.decoded()["event"] == "DICOM Instances Transferred" and ds.SOPInstanceUID in e.record
                         for e in audit_log.query("patient", "AUDIT-PAT-2", None, None)), timeout=60)
    done = _cli(grid, "audit", "verify", "--site", "A", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    (verdict,) = json.loads(done.stdout)
    assert verdict["ok"] and verdict["records"] > 3

    entries = [e for e in audit_log.entries("A")][:8]
    month = entries[0].decoded()["occurred_at"][:7]
    assert all(e.decoded()["occurred_at"][:7] == month for e in entries)
    changed, removed, swapped = entries[1], entries[3], (entries[5], entries[6])
    db = audit_log.db

    def put(seq: int, entry) -> None:
        db.execute("INSERT INTO audit_log (site, month, seq, occurred_at, event_id, record, prev_hash, hash)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   ("A", month, seq, entry.occurred_at, entry.event_id, entry.record, entry.prev_hash, entry.hash))

    try:
        edited = changed.decoded()
        edited["outcome_description"] = "nothing happened here"
        db.execute("UPDATE audit_log SET record = ? WHERE site = ? AND month = ? AND seq = ?",
                   (json.dumps(edited, sort_keys=True, separators=(",", ":")), "A", month, changed.seq))
        db.execute("DELETE FROM audit_log WHERE site = ? AND month = ? AND seq = ?", ("A", month, removed.seq))
        put(swapped[0].seq, swapped[1])
        put(swapped[1].seq, swapped[0])
        done = _cli(grid, "audit", "verify", "--site", "A")
        assert done.returncode == 1 and "TAMPERED" in done.stdout, done.stdout
        assert f"record {changed.seq} ({changed.event_id}) was changed" in done.stdout
        assert f"records {removed.seq}..{removed.seq} are missing" in done.stdout
        assert f"record {removed.seq + 1} does not link" in done.stdout  # the one after the gap
        assert f"record {swapped[0].seq} does not link" in done.stdout
    finally:
        for entry in (changed, removed, *swapped):
            put(entry.seq, entry)
    assert _cli(grid, "audit", "verify", "--site", "A").returncode == 0


def test_audit_query_answers_who_accessed_a_patient(grid, taps):
    ds = make_instance(patient_id="AUDIT-PAT-3")
    started = time.time()
    assert c_store(grid.site("A"), [ds]) == [0]
    events_for(taps(), [ds.SOPInstanceUID])
    wado = f"http://127.0.0.1:{grid.site('B').http_port}/dicomweb/studies/{ds.StudyInstanceUID}"
    wait_for(lambda: web.get(wado).status_code == 200, timeout=60)

    def lines():
        done = _cli(grid, "audit", "query", "--patient", "AUDIT-PAT-3", "--json")
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    found = wait_for(lambda: (r := lines()) and {x["site"] for x in r} >= {"A", "B"} and r, timeout=60)
    assert {(r["site"], r["event"], r["action"]) for r in found} >= {
        ("A", "DICOM Instances Transferred", "C"), ("B", "DICOM Instances Transferred", "R")}
    assert all(r["occurred_at"] >= time.strftime("%Y-%m-%d", time.gmtime(started - 60)) for r in found)
    human = _cli(grid, "audit", "query", "--patient", "AUDIT-PAT-3", "--since", "2000-01-01")
    assert human.returncode == 0 and "DICOM Instances Transferred" in human.stdout
    none = _cli(grid, "audit", "query", "--patient", "AUDIT-PAT-3", "--until", "2000-01-01")
    assert none.returncode == 0 and none.stdout.strip() == ""

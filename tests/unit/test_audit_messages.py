"""Audit records as DICOM audit messages: every event the grid audits renders valid XML (the standard's
schema), and the spool keeps what Kafka has not confirmed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from dicomgrid import schemas
from dicomgrid.core.audit import AuditObject, Participant, audit_record, patient_object, to_xml
from dicomgrid.core.audit_codes import EVENT_IDS
from dicomgrid.core.audit_spool import AuditSpool

SCHEMA = Path(__file__).parents[2] / "schemas" / "audit"


def test_the_rng_is_the_one_generated_from_the_standards_schema():
    rnc = (SCHEMA / "audit-message.rnc").read_text()
    assert "Source: DICOM PS3.15" in rnc
    assert schemas.audit_rng_from_rnc(rnc) == (SCHEMA / "audit-message.rng").read_text()


PEERS = [Participant("STORESCU", True, "STORESCU", "10.0.0.7:40123", "Source"),
         Participant("A", False, "GRID_A", None, "Destination"),
         Participant("viewer.example.org", True, None, "viewer.example.org", "Requestor")]
OBJECTS = [*patient_object("PAT-1", "Doe^Jane"), AuditObject("study", "1.2.3", {"instances": 2}),
           AuditObject("instance", "1.2.3.4", {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "study_uid": "1.2.3"}),
           AuditObject("instance", "1.2.9.9", {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.4"}),
           AuditObject("query", "1.2.840.10008.5.1.4.1.2.2.1", {"level": "STUDY", "keys": {"PatientID": "PAT-1"}}),
           AuditObject("payload", "ab" * 32, {"size": 10}), AuditObject("trial", "TRIAL-1")]


@pytest.mark.parametrize("event", sorted(EVENT_IDS))
@pytest.mark.parametrize("outcome", [0, 4, 8, 12])
def test_every_event_renders_a_valid_audit_message(event: str, outcome: int):
    record = audit_record("A", "E", event, outcome, "C-GET completed <b>& more</b>", PEERS, OBJECTS)
    schemas.validate_event(schemas.TOPIC_AUDIT, record)
    xml = to_xml(record)
    validator = schemas.audit_message_schema()
    assert validator.validate(etree.fromstring(xml)), validator.error_log
    root = etree.fromstring(xml)
    assert root.find("EventIdentification/EventID").get("csd-code") == EVENT_IDS[event].code
    patient = root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient.get("ParticipantObjectID") == "PAT-1" and patient.findtext("ParticipantObjectName") == "Doe^Jane"
    assert root.find("ActiveParticipant").get("AlternativeUserID") == "AETITLE=STORESCU"


def test_an_event_without_a_dicom_code_is_refused():
    with pytest.raises(ValueError, match="no DICOM EventID"):
        audit_record("A", "E", "Something Else", 0, "", PEERS, [])


def _record(n: int) -> dict:
    return audit_record("A", "E", "Query", 0, f"query {n}", PEERS[:1], [])


def test_the_spool_keeps_records_until_they_are_confirmed(tmp_path: Path):
    spool = AuditSpool(tmp_path)
    tokens = [spool.append(_record(n)) for n in range(3)]
    assert spool.pending() == 3 and list(spool.undelivered()) == []  # all on their way
    spool.delivered(tokens[0])
    spool.failed(tokens[1])
    assert [t for t, _ in spool.undelivered()] == [tokens[1]]
    spool.delivered(tokens[1])
    spool.delivered(tokens[2])
    assert spool.pending() == 0


def test_a_dead_processes_spool_is_adopted_and_emptied(tmp_path: Path):
    # What a killed process left: its spool file with three records, no longer locked by anyone.
    records = [_record(n) for n in range(3)]
    (tmp_path / "999-dead.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    spool = AuditSpool(tmp_path)
    due = list(spool.undelivered())
    assert {t for t, _ in due} == {r["event_id"] for r in records}
    for token, _ in due:
        spool.delivered(token)
    assert not (tmp_path / "999-dead.jsonl").exists()
    # A live process's file is left alone.
    other = AuditSpool(tmp_path)
    assert list(other.undelivered()) == [] and len(list(tmp_path.glob("*.jsonl"))) == 2

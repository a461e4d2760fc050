"""Builders for the grid's Kafka events (their contract: schemas/events/*.schema.json)."""

from __future__ import annotations

import base64
import datetime as dt
import random
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobRef
from dicomgrid.core.dicomfile import IndexAttributes

Protocol = Literal["DIMSE", "STOW-RS", "REPLICATION", "IMPORT"]
# What made a copy of a payload at a site other than the one that received it.
CopyCause = Literal["replication", "repair", "recovery", "scrub"]


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# The major version of each topic's events (docs/events.md, Compatibility); 1 unless listed.
SCHEMA_VERSIONS = {
    # 2: ``version`` and ``replaces`` left the event; the indexer numbers versions (schemas/events/
    # instance-stored.schema.json).
    schemas.TOPIC_INSTANCE_STORED: 2,
}


def new_event_id() -> str:
    """A random (version 4) UUID, drawn from the ``random`` module's generator.

    ``uuid.uuid4`` asks the OS for each one (``getrandom``), a system call that hands the GIL to another
    association's thread, twice per stored instance (its event and its audit record). The generator is
    seeded by the OS when the process starts, and again in a forked child; event ids must be unique,
    not secret.
    """
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


def envelope(event_type: str) -> dict[str, Any]:
    return {
        "event_id": new_event_id(),
        "event_type": event_type,
        "schema_version": SCHEMA_VERSIONS.get(event_type, 1),
        "occurred_at": utc_now(),
    }


@dataclass(frozen=True)
class StoredVersion:
    """A payload of a SOP Instance UID and the version number the indexer gave it."""

    sha256: str
    version: int


@dataclass(frozen=True)
class Source:
    """Who sent an instance, and how."""

    protocol: Protocol
    calling_ae: str | None = None
    called_ae: str | None = None
    peer_address: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            "peer_address": self.peer_address,
        }


def instance_stored(
    site: str,
    source: Source,
    attrs: IndexAttributes,
    transfer_syntax_uid: str,
    blob: BlobRef,
) -> dict[str, Any]:
    """The ``dicom.instance.stored`` event for a payload that is durable in ``site``'s blob store.

    It names no version: the indexer numbers the payloads of a SOP Instance UID (schema version 2).
    """
    a = attrs.get
    return {
        **envelope(schemas.TOPIC_INSTANCE_STORED),
        "site": site,
        "source": source.as_dict(),
        "patient": {
            "id": a("PatientID"),
            "issuer": a("IssuerOfPatientID"),
            "name": a("PatientName"),
            "birth_date": a("PatientBirthDate"),
            "sex": a("PatientSex"),
        },
        "study": {
            "uid": a("StudyInstanceUID"),
            "date": a("StudyDate"),
            "time": a("StudyTime"),
            "accession_number": a("AccessionNumber"),
            "id": a("StudyID"),
            "description": a("StudyDescription"),
            "referring_physician_name": a("ReferringPhysicianName"),
            "specific_character_set": a("SpecificCharacterSet"),
        },
        "series": {
            "uid": a("SeriesInstanceUID"),
            "modality": a("Modality"),
            "number": a("SeriesNumber"),
            "description": a("SeriesDescription"),
            "body_part_examined": a("BodyPartExamined"),
            "date": a("SeriesDate"),
            "time": a("SeriesTime"),
        },
        "instance": {
            "sop_class_uid": a("SOPClassUID"),
            "sop_instance_uid": a("SOPInstanceUID"),
            "transfer_syntax_uid": transfer_syntax_uid,
            "number": a("InstanceNumber"),
            "rows": a("Rows"),
            "columns": a("Columns"),
            "number_of_frames": a("NumberOfFrames"),
        },
        "payload": blob.as_payload(),
    }


@dataclass(frozen=True)
class InstanceRef:
    """The instance a payload holds, as replication events name it."""

    study_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None = None
    received_at: str | None = None  # the receiving site's dicom.instance.stored occurred_at

    @classmethod
    def of_event(cls, event: dict[str, Any]) -> "InstanceRef":
        """The instance of a ``dicom.instance.stored`` or replication event."""
        if "instance" in event:
            inst = event["instance"]
            return cls(event["study"]["uid"], inst["sop_instance_uid"], inst.get("sop_class_uid"), event["occurred_at"])
        return cls(event["study_uid"], event["sop_instance_uid"], event.get("sop_class_uid"), event.get("received_at"))

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"study_uid": self.study_uid, "sop_instance_uid": self.sop_instance_uid}
        if self.sop_class_uid:
            out["sop_class_uid"] = self.sop_class_uid
        if self.received_at:
            out["received_at"] = self.received_at
        return out


def replication_requested(
    source: dict[str, Any], target_site: str, instance: InstanceRef, *, attempt: int = 1, cause_event_id: str | None = None
) -> dict[str, Any]:
    """Copy the payload ``source`` (a payload reference) to ``target_site``."""
    event = {**envelope(schemas.TOPIC_REPLICATION_REQUESTED), "source": source, "target_site": target_site,
             **instance.fields(), "attempt": attempt}
    if cause_event_id:
        event["cause_event_id"] = cause_event_id
    return event


def replica_stored(
    replica: BlobRef, source_site: str, instance: InstanceRef, *, cause: CopyCause,
    request_event_id: str | None = None,
) -> dict[str, Any]:
    """``replica.site`` now holds a verified copy, fetched from ``source_site``."""
    event = {**envelope(schemas.TOPIC_REPLICA_STORED), "replica": replica.as_payload(), "source_site": source_site,
             **instance.fields(), "cause": cause}
    if request_event_id:
        event["request_event_id"] = request_event_id
    return event


def replication_failed(request: dict[str, Any], reason: str, *, retryable: bool) -> dict[str, Any]:
    """A replication request that gave up after ``request["attempt"]`` attempts."""
    event = {**envelope(schemas.TOPIC_REPLICATION_FAILED), "source": request["source"],
             "target_site": request["target_site"], **InstanceRef.of_event(request).fields(),
             "attempt": request["attempt"], "reason": reason[:2048], "retryable": retryable,
             "request_event_id": request["event_id"]}
    return event


def dead_letter(
    processor: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str
) -> dict[str, Any]:
    """A message ``processor`` gave up on, kept verbatim with where it came from and why."""
    event = {**envelope(schemas.TOPIC_DEADLETTER), "processor": processor, "topic": topic, "partition": partition,
             "offset": offset, "key": key.decode("utf-8", "replace") if key is not None else None,
             "reason": reason[:2048], "value": value.decode("utf-8", "replace") if value is not None else None}
    if value is not None:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            event["value_base64"] = base64.b64encode(value).decode()
    return event


def scrub_finding(
    site: str, sha256: str, finding: Literal["missing", "corrupt"], *, repaired_from: str | None,
    quarantined: str | None = None, reason: str | None = None,
) -> dict[str, Any]:
    """What a scrub found wrong with a copy ``site`` should hold, and whether it was repaired."""
    event = {**envelope(schemas.TOPIC_SCRUB_FINDING), "site": site, "sha256": sha256, "finding": finding,
             "outcome": "repaired" if repaired_from else "unrepaired"}
    if repaired_from:
        event["repaired_from"] = repaired_from
    if quarantined:
        event["quarantined"] = quarantined[:512]
    if reason:
        event["reason"] = reason[:2048]
    return event

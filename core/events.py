"""Builders for the grid's Kafka events (their contract: schemas/events/*.schema.json)."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobRef
from dicomgrid.core.dicomfile import IndexAttributes

Protocol = Literal["DIMSE", "STOW-RS", "REPLICATION", "IMPORT"]


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def envelope(event_type: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": utc_now(),
    }


@dataclass(frozen=True)
class StoredVersion:
    """The payload currently indexed for a SOP Instance UID."""

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
    previous: StoredVersion | None,
) -> dict[str, Any]:
    """The ``dicom.instance.stored`` event for a payload that is durable in ``site``'s blob store."""
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
        "version": previous.version + 1 if previous else 1,
        "replaces": {"sha256": previous.sha256, "version": previous.version} if previous else None,
    }

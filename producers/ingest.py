"""The one ingest path every protocol goes through: validate, make durable, publish, then say yes.

Order matters and is the grid's durability promise:

1. validate the minimum (readable data set, valid UIDs that agree with the request) -> no side effects
   when it fails;
2. write the payload to the site's content-addressed blob store (fsync + atomic rename);
3. publish ``dicom.instance.stored`` with acks=all and wait for the delivery report;
4. only then report success to the sender.

A payload identical to the one already indexed for its SOP Instance UID is an idempotent success with
no new event. A different payload for a known UID is stored as a new version (the earlier one is kept)
and its event names the version it replaces.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from dicomgrid import schemas
from dicomgrid.core.audit import (
    MINOR_FAILURE,
    SERIOUS_FAILURE,
    SUCCESS,
    AuditObject,
    AuditTrail,
    Participant,
    patient_object,
)
from dicomgrid.core.blobstore import BlobStore, BlobStoreError, PayloadTooLarge
from dicomgrid.core.dicomfile import MAX_TEXT, MalformedDicom, canonical_file_meta, inspect
from dicomgrid.core.events import Source, instance_stored
from dicomgrid.core.kafka import EventPublisher, PublishError
from dicomgrid.core import metrics
from dicomgrid.core.logging import get_logger
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.events import StoredVersion
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.index_writer import IndexWriter
from dicomgrid.core.uids import is_valid_uid

log = get_logger(__name__)


class Outcome(enum.Enum):
    """What happened to one instance, with the DICOM status (PS3.4 B.2.3) a sender is given."""

    STORED = (0x0000, "stored")
    DUPLICATE = (0x0000, "already stored (identical bytes)")
    # Refused: Out of Resources. The sender should retry later.
    NO_STORAGE = (0xA700, "out of resources: payload could not be made durable")
    NO_EVENT_LOG = (0xA701, "out of resources: event log unavailable")
    TOO_LARGE = (0xA702, "out of resources: payload exceeds the site's limit")
    # Error: Data Set does not match SOP Class (request and data set disagree).
    MISMATCH = (0xA900, "data set does not match the request")
    # Error: Cannot understand.
    MALFORMED = (0xC000, "cannot understand: malformed data set")
    BAD_UID = (0xC001, "cannot understand: missing or invalid UID")
    TEXT_TOO_LONG = (0xC002, "cannot understand: indexed attribute too long")

    def __init__(self, status: int, text: str) -> None:
        self.status = status
        self.text = text

    @property
    def ok(self) -> bool:
        return self.status == 0x0000

    @property
    def reason(self) -> str:
        """The text without the category the status code already says ("cannot understand", ...)."""
        return self.text.split(": ", 1)[-1]


# Audit severity (PS3.15 A.5.3 EventOutcomeIndicator) of each outcome: refusals of bad input are minor,
# anything that made a well-formed instance unstorable is serious.
_AUDIT_OUTCOME = {
    Outcome.STORED: SUCCESS,
    Outcome.DUPLICATE: SUCCESS,
    Outcome.NO_STORAGE: SERIOUS_FAILURE,
    Outcome.NO_EVENT_LOG: SERIOUS_FAILURE,
    Outcome.TOO_LARGE: MINOR_FAILURE,
    Outcome.MISMATCH: MINOR_FAILURE,
    Outcome.MALFORMED: MINOR_FAILURE,
    Outcome.BAD_UID: MINOR_FAILURE,
    Outcome.TEXT_TOO_LONG: MINOR_FAILURE,
}


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    detail: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    event: dict[str, Any] | None = None
    # (PatientID, PatientName) of the data set, for the audit trail only.
    patient: tuple[str | None, str | None] = (None, None)

    @property
    def ok(self) -> bool:
        return self.outcome.ok

    @property
    def error_comment(self) -> str:
        """What a DICOM sender is told (Error Comment is LO: 64 characters, no backslash): the status
        code gives the category, so the comment starts with what is wrong."""
        return f"{self.outcome.reason}: {self.detail}".replace("\\", "/")[:64]


@dataclass(frozen=True)
class Expected:
    """What the transport said the payload is (C-STORE request fields, STOW-RS study in the URL)."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None


class RecentVersions:
    """The versions this process stored last, by SOP Instance UID (bounded, thread-safe).

    A PACS that resends at once must get "identical" or "next version" even before the location row
    written at ingest is readable in Cassandra, so the process answers from its own memory first.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, StoredVersion] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sop_instance_uid: str) -> StoredVersion | None:
        with self._lock:
            return self._items.get(sop_instance_uid)

    def put(self, sop_instance_uid: str, version: StoredVersion) -> None:
        with self._lock:
            self._items[sop_instance_uid] = version
            self._items.move_to_end(sop_instance_uid)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


def newest(*versions: StoredVersion | None) -> StoredVersion | None:
    known = [v for v in versions if v is not None]
    return max(known, key=lambda v: v.version) if known else None


class Ingestor:
    """Ingest for one site; thread-safe, shared by every association and HTTP request of a process."""

    def __init__(
        self,
        site: str,
        blobs: BlobStore,
        publisher: EventPublisher,
        db: Cassandra | None,
        audit: AuditTrail,
        *,
        max_instance_bytes: int | None = None,
        delivery_timeout_s: float | None = None,
    ) -> None:
        self.site = site
        self.blobs = blobs
        self.publisher = publisher
        self.db = db
        # The index is only read to recognise re-sent instances, and written to make a new version's
        # location visible before the indexer gets to it.
        self.index = IndexReader(db) if db is not None else None
        self.writer = IndexWriter(db) if db is not None else None
        self.audit = audit
        self.max_instance_bytes = max_instance_bytes
        self.delivery_timeout_s = delivery_timeout_s
        self.recent = RecentVersions()

    def flush(self, timeout: float = 5.0) -> None:
        """Deliver what is still queued (audit records) before the process exits."""
        self.publisher.flush(timeout)
        self.audit.flush(timeout)

    def ingest(self, fp: BinaryIO, source: Source, expected: Expected = Expected()) -> IngestResult:
        """Ingest one Part 10 file (any file meta; it is replaced by the grid's canonical one)."""
        return self.report(self._ingest(fp, source, expected), source)

    def report(self, result: IngestResult, source: Source) -> IngestResult:
        """Log and audit an outcome (also for input refused before it reached :meth:`ingest`)."""
        self._audit(result, source)
        metrics.INSTANCES_RECEIVED.labels(self.site, source.protocol, f"0x{result.outcome.status:04X}").inc()
        if result.event is not None:
            metrics.BYTES_RECEIVED.labels(self.site, source.protocol).inc(result.event["payload"]["size"])
        if result.ok:
            log.debug("instance ingested", outcome=result.outcome.name, sop_instance_uid=result.sop_instance_uid)
        else:
            log.warning(
                "instance refused",
                status=f"0x{result.outcome.status:04X}",
                reason=result.detail,
                calling_ae=source.calling_ae,
                peer=source.peer_address,
                sop_instance_uid=result.sop_instance_uid,
            )
        return result

    def _ingest(self, fp: BinaryIO, source: Source, expected: Expected) -> IngestResult:
        # 1. Validate: nothing is written before this passes.
        try:
            found = inspect(fp)
        except MalformedDicom as exc:
            return IngestResult(Outcome.MALFORMED, str(exc), expected.sop_class_uid, expected.sop_instance_uid)
        transfer_syntax, attrs, offset = found.transfer_syntax_uid, found.attributes, found.offset
        sop_class, sop_instance = attrs.get("SOPClassUID"), attrs.get("SOPInstanceUID")
        study, series = attrs.get("StudyInstanceUID"), attrs.get("SeriesInstanceUID")
        ids = dict(sop_class_uid=sop_class, sop_instance_uid=sop_instance, study_uid=study,
                   patient=(attrs.get("PatientID"), attrs.get("PatientName")))
        for name, value in (
            ("SOPClassUID", sop_class),
            ("SOPInstanceUID", sop_instance),
            ("StudyInstanceUID", study),
            ("SeriesInstanceUID", series),
            ("TransferSyntaxUID", transfer_syntax),
        ):
            if not is_valid_uid(value):
                shown = "missing" if not value else f"invalid ({_shorten(value)})"
                return IngestResult(Outcome.BAD_UID, f"{name} {shown}", **ids)
        if attrs.too_long:
            # Named, never shown: the value is patient data.
            name, length = next(iter(attrs.too_long.items()))
            size = f"{length} characters" if length is not None else "over 64 KiB"
            return IngestResult(Outcome.TEXT_TOO_LONG, f"{name} ({size} > {MAX_TEXT})", **ids)
        for name, want, got in (
            ("SOPClassUID", expected.sop_class_uid, sop_class),
            ("SOPInstanceUID", expected.sop_instance_uid, sop_instance),
            ("StudyInstanceUID", expected.study_uid, study),
        ):
            if want is not None and want != got:
                return IngestResult(Outcome.MISMATCH, f"{name} in data set ({_shorten(got)}) != request ({_shorten(want)})", **ids)
        size = fp.seek(0, 2) - offset
        if self.max_instance_bytes is not None and size > self.max_instance_bytes:
            return IngestResult(Outcome.TOO_LARGE, f"{size} bytes > limit {self.max_instance_bytes}", **ids)

        lookup = self._current_version(sop_instance)

        # 2. Durable payload.
        try:
            with self.blobs.writer(max_bytes=self.max_instance_bytes) as writer:
                writer.write(canonical_file_meta(sop_class, sop_instance, transfer_syntax))
                writer.copy_from(fp, offset)
                blob = writer.commit()
        except PayloadTooLarge as exc:
            return IngestResult(Outcome.TOO_LARGE, str(exc), **ids)
        except BlobStoreError as exc:
            return IngestResult(Outcome.NO_STORAGE, str(exc), **ids)

        previous = newest(lookup(), self.recent.get(sop_instance))
        if previous is not None and previous.sha256 == blob.sha256:
            return IngestResult(Outcome.DUPLICATE, f"payload {blob.sha256[:12]} already indexed", **ids)

        # 3. Durable event; 4. success only after the brokers confirm it.
        event = instance_stored(self.site, source, attrs, transfer_syntax, blob, previous)
        try:
            self.publisher.publish_and_wait(schemas.TOPIC_INSTANCE_STORED, study, event, self.delivery_timeout_s)
        except schemas.InvalidEvent as exc:
            # What the checks above let through but the event contract does not (the payload stays in
            # the blob store, content-addressed and unreferenced, like any refused resend).
            return IngestResult(Outcome.MALFORMED, str(exc), **ids)
        except PublishError as exc:
            # The payload stays in the blob store (content-addressed, harmless); the sender retries.
            return IngestResult(Outcome.NO_EVENT_LOG, str(exc), **ids)
        self.recent.put(sop_instance, StoredVersion(blob.sha256, event["version"]))
        self._record_location(event)
        return IngestResult(Outcome.STORED, f"payload {blob.sha256[:12]} version {event['version']}", event=event, **ids)

    def _current_version(self, sop_instance_uid: str) -> Callable[[], StoredVersion | None]:
        """Start looking up the indexed payload for this UID; the result is None if unknown.

        Ingest must not depend on Cassandra being up: Kafka is the durability boundary, and the indexer
        orders versions by receive time whatever this lookup said. So a failed lookup means "unknown".
        """

        def unknown(exc: Exception) -> None:
            log.warning("version lookup failed; treating instance as new", error=str(exc))

        if self.index is None:
            return lambda: None
        try:
            pending = self.index.current_version(sop_instance_uid)
        except Exception as exc:  # driver errors: NoHostAvailable, timeouts, ...
            unknown(exc)
            return lambda: None

        def result() -> StoredVersion | None:
            try:
                return pending()
            except Exception as exc:
                return unknown(exc)

        return result

    def _record_location(self, event: dict[str, Any]) -> None:
        """Make this version visible to other processes' lookups soon (a hint: the indexer writes it too)."""
        if self.writer is None:
            return
        try:
            self.writer.record_location(event)
        except Exception as exc:  # Cassandra down: the event is durable, the indexer catches up later
            log.warning("location not recorded at ingest; a quick resend may repeat its event", error=str(exc))

    def _audit(self, result: IngestResult, source: Source) -> None:
        outcome = _AUDIT_OUTCOME[result.outcome]
        # A refused over-long attribute may be the patient's name or ID: such values stay out of the trail.
        objects = patient_object(*result.patient) if result.outcome is not Outcome.TEXT_TOO_LONG else []
        if result.study_uid and is_valid_uid(result.study_uid):
            objects.append(AuditObject("study", result.study_uid))
        if result.sop_instance_uid and is_valid_uid(result.sop_instance_uid):
            objects.append(AuditObject("instance", result.sop_instance_uid, {"sop_class_uid": result.sop_class_uid}))
        self.audit.record(
            "C",
            "DICOM Instances Transferred",
            outcome,
            f"{source.protocol} {result.outcome.text}: {result.detail}",
            [
                Participant(source.calling_ae or "unknown", True, source.calling_ae, source.peer_address, "Source"),
                Participant(self.site, False, source.called_ae, None, "Destination"),
            ],
            objects,
        )


def _shorten(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""The one ingest path every protocol goes through: validate, make durable, publish, then say yes.

Order matters and is the grid's durability promise:

1. validate the minimum (readable data set, valid UIDs that agree with the request) -> no side effects
   when it fails;
2. write the payload to the site's content-addressed blob store (fsync + atomic rename);
3. publish ``dicom.instance.stored`` with acks=all and wait for the delivery report;
4. only then report success to the sender.

The receive path makes no Cassandra round trip. A payload that is already stored under its digest and
whose event the brokers acknowledged (the blob carries that mark, see
:meth:`~dicomgrid.core.blobstore.BlobStore.mark_announced`) is an identical resend: an idempotent success
with no new event. Any other payload gets its event, without a version number: the indexer numbers the
payloads of a SOP Instance UID (a different payload for a known UID becomes its next version, the
earlier one is kept; the rule is in docs/events.md). The digest covers the canonical file meta, which
names the SOP Instance UID, so a digest is never shared by two instances.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, BinaryIO

from dicomgrid import schemas
from dicomgrid.core.audit import (
    MINOR_FAILURE,
    SERIOUS_FAILURE,
    SUCCESS,
    AuditObject,
    AuditTrail,
    patient_object,
)
from dicomgrid.core.blobstore import BlobRef, BlobStore, BlobStoreError, BlobWriter, PayloadTooLarge, SpareTemp
from dicomgrid.core.dicomfile import MAX_TEXT, Inspection, MalformedDicom, canonical_file_meta, inspect
from dicomgrid.core.events import Source, instance_stored
from dicomgrid.core.kafka import EventPublisher, PublishError
from dicomgrid.core import metrics
from dicomgrid.core.logging import get_logger
from dicomgrid.core.uids import is_valid_uid
from dicomgrid.producers.store_audit import StoreAudit, store_participants

log = get_logger(__name__)

# A received data set up to this size is also kept in memory while it is written, and checked there
# (most images of a CT or MR series are far smaller); a larger one is read back from its temp file.
CHECKED_IN_MEMORY_BYTES = 1024 * 1024


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
    # The request's own field at fault (a DIMSE tag such as 0x00001000), for the Offending Element.
    offending_element: int | None = None

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


class Ingestor:
    """Ingest for one site; thread-safe, shared by every association and HTTP request of a process."""

    def __init__(
        self,
        site: str,
        blobs: BlobStore,
        publisher: EventPublisher,
        db: Any,
        audit: AuditTrail,
        *,
        max_instance_bytes: int | None = None,
        delivery_timeout_s: float | None = None,
    ) -> None:
        self.site = site
        self.blobs = blobs
        self.publisher = publisher
        # Not used on the receive path (no Cassandra round trip per instance); kept for the services
        # that share the site context.
        self.db = db
        self.audit = audit
        self.max_instance_bytes = max_instance_bytes
        self.delivery_timeout_s = delivery_timeout_s

    def flush(self, timeout: float = 5.0) -> None:
        """Deliver what is still queued (audit records) before the process exits."""
        self.publisher.flush(timeout)
        self.audit.flush(timeout)

    def ingest(self, fp: BinaryIO, source: Source, expected: Expected = Expected(),
               batch: StoreAudit | None = None) -> IngestResult:
        """Ingest one Part 10 file (any file meta; it is replaced by the grid's canonical one).

        ``batch``: the audit of the association or request the file came with; a success is audited
        in its record (:mod:`dicomgrid.producers.store_audit`), anything else at once on its own.
        """
        return self.report(self._ingest(fp, source, expected), source, batch)

    def report(self, result: IngestResult, source: Source, batch: StoreAudit | None = None) -> IngestResult:
        """Log and audit an outcome (also for input refused before it reached :meth:`ingest`)."""
        self._audit(result, source, batch)
        return self._count(result, source)

    def _count(self, result: IngestResult, source: Source) -> IngestResult:
        """Count and log an outcome already audited."""
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

    def receive(self, source: Source, expected: Expected, transfer_syntax_uid: str,
                batch: StoreAudit | None = None, spare: SpareTemp | None = None) -> "Reception":
        """Ingest one data set as it arrives (a C-STORE's fragments), straight into the blob store.

        The canonical file meta is known before the first byte (the request names the SOP Class and
        Instance, the presentation context the transfer syntax), so the payload is written and hashed
        in one pass, with no spool copy. :meth:`Reception.complete` then checks it as :meth:`ingest`
        does before anything is made durable or announced. ``spare``: a temp file made ahead for it
        (:meth:`BlobStore.spare`), used or discarded.
        """
        return Reception(self, source, expected, transfer_syntax_uid, batch, spare)

    def _ingest(self, fp: BinaryIO, source: Source, expected: Expected) -> IngestResult:
        checked = self._check(fp, expected)
        if isinstance(checked, IngestResult):
            return checked
        found, ids = checked
        size = fp.seek(0, 2) - found.offset
        if self.max_instance_bytes is not None and size > self.max_instance_bytes:
            return IngestResult(Outcome.TOO_LARGE, f"{size} bytes > limit {self.max_instance_bytes}", **ids)

        # 2. Durable payload.
        attrs = found.attributes
        try:
            with self.blobs.writer(max_bytes=self.max_instance_bytes) as writer:
                writer.hold(canonical_file_meta(attrs.get("SOPClassUID"), attrs.get("SOPInstanceUID"), found.transfer_syntax_uid))
                writer.copy_from(fp, found.offset)
                blob = writer.commit()
                existed = writer.existed
        except PayloadTooLarge as exc:
            return IngestResult(Outcome.TOO_LARGE, str(exc), **ids)
        except BlobStoreError as exc:
            return IngestResult(Outcome.NO_STORAGE, str(exc), **ids)
        return self._announce(found, ids, blob, existed, source)

    def _check(self, fp: BinaryIO, expected: Expected, data_set_at: tuple[int, str] | None = None,
               ) -> IngestResult | tuple[Inspection, dict[str, Any]]:
        """1. Validate: nothing is written or announced before this passes."""
        try:
            found = inspect(fp, data_set_at)
        except MalformedDicom as exc:
            return IngestResult(Outcome.MALFORMED, str(exc), expected.sop_class_uid, expected.sop_instance_uid)
        transfer_syntax, attrs = found.transfer_syntax_uid, found.attributes
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
        return found, ids

    def _announce(self, found: Inspection, ids: dict[str, Any], blob: BlobRef, existed: bool,
                  source: Source) -> IngestResult:
        """3. Durable event; 4. success only after the brokers confirm it."""
        # An identical resend: the same bytes are stored and their event is in Kafka. (Stored but not
        # marked: an earlier attempt failed before the brokers confirmed, or the copy came by
        # replication; announced again, which the indexer recognises by the digest.)
        if existed and self.blobs.is_announced(blob.sha256):
            return IngestResult(Outcome.DUPLICATE, f"payload {blob.sha256[:12]} already stored", **ids)
        event = instance_stored(self.site, source, found.attributes, found.transfer_syntax_uid, blob)
        try:
            self.publisher.publish_and_wait(schemas.TOPIC_INSTANCE_STORED, ids["study_uid"], event, self.delivery_timeout_s)
        except schemas.InvalidEvent as exc:
            # What the checks above let through but the event contract does not (the payload stays in
            # the blob store, content-addressed and unreferenced, like any refused resend).
            return IngestResult(Outcome.MALFORMED, str(exc), **ids)
        except PublishError as exc:
            # The payload stays in the blob store (content-addressed, harmless); the sender retries.
            return IngestResult(Outcome.NO_EVENT_LOG, str(exc), **ids)
        self.blobs.mark_announced(blob.sha256)
        return IngestResult(Outcome.STORED, f"payload {blob.sha256[:12]}", event=event, **ids)

    def _audit(self, result: IngestResult, source: Source, batch: StoreAudit | None) -> None:
        # A refused over-long attribute may be the patient's name or ID: such values stay out of the trail.
        objects = patient_object(*result.patient) if result.outcome is not Outcome.TEXT_TOO_LONG else []
        if result.study_uid and is_valid_uid(result.study_uid):
            objects.append(AuditObject("study", result.study_uid))
        if result.sop_instance_uid and is_valid_uid(result.sop_instance_uid):
            objects.append(AuditObject("instance", result.sop_instance_uid, {"sop_class_uid": result.sop_class_uid}))
        description = f"{source.protocol} {result.outcome.text}: {result.detail}"
        if batch is not None and result.ok:
            batch.add(study_uid=result.study_uid, sop_instance_uid=result.sop_instance_uid,  # type: ignore[arg-type]
                      sop_class_uid=result.sop_class_uid, patient=result.patient,  # type: ignore[arg-type]
                      duplicate=result.outcome is Outcome.DUPLICATE, description=description, objects=objects)
            return
        self.audit.record("C", "DICOM Instances Transferred", _AUDIT_OUTCOME[result.outcome], description,
                          store_participants(self.site, source), objects)



class Reception:
    """One data set being received into the blob store; see :meth:`Ingestor.receive`.

    :meth:`write` takes the fragments in order; :meth:`complete` checks, commits and announces, :meth:`audit`
    audits the outcome and :meth:`report` counts and logs it, once each; :meth:`abort` drops what was
    written (the sender went away).
    """

    def __init__(self, ingestor: Ingestor, source: Source, expected: Expected, transfer_syntax_uid: str,
                 batch: StoreAudit | None = None, spare: SpareTemp | None = None) -> None:
        self._ingestor = ingestor
        self._source = source
        self._batch = batch
        self._expected = expected
        self._refused: IngestResult | None = None
        self._writer: BlobWriter | None = None
        ids = dict(sop_class_uid=expected.sop_class_uid, sop_instance_uid=expected.sop_instance_uid)
        for name, tag, value in (("AffectedSOPClassUID", 0x00000002, expected.sop_class_uid),
                                 ("AffectedSOPInstanceUID", 0x00001000, expected.sop_instance_uid)):
            if not is_valid_uid(value):
                shown = "missing" if not value else f"invalid ({_shorten(value)})"
                self._refused = IngestResult(Outcome.BAD_UID, f"{name} of the request {shown}", **ids,
                                             offending_element=tag)
                if spare is not None:
                    spare.discard()
                return
        meta = canonical_file_meta(expected.sop_class_uid, expected.sop_instance_uid,  # type: ignore[arg-type]
                                   transfer_syntax_uid)
        # Written here, so known: the check reads the data set only.
        self._data_set_at = (len(meta), transfer_syntax_uid)
        try:
            self._writer = BlobWriter(ingestor.blobs, ingestor.max_instance_bytes, keep=CHECKED_IN_MEMORY_BYTES,
                                      spare=spare)
            self._writer.hold(meta)
        except BlobStoreError as exc:
            self._fail(IngestResult(Outcome.NO_STORAGE, str(exc), **ids))

    def _fail(self, result: IngestResult) -> None:
        self._refused = result
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def write(self, data: bytes | memoryview) -> None:
        if self._writer is None:
            return  # refused already: the rest of the data set is read and dropped
        try:
            self._writer.write(data)
        except PayloadTooLarge as exc:
            self._fail(IngestResult(Outcome.TOO_LARGE, str(exc), self._expected.sop_class_uid,
                                    self._expected.sop_instance_uid))
        except BlobStoreError as exc:
            self._fail(IngestResult(Outcome.NO_STORAGE, str(exc), self._expected.sop_class_uid,
                                    self._expected.sop_instance_uid))

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def audit(self, result: IngestResult) -> None:
        """Audit ``result`` (what :meth:`complete` returned): before the response, so that a store the
        sender is told succeeded has its record held in the spool even if the process dies right after
        answering."""
        self._ingestor._audit(result, self._source, self._batch)

    def report(self, result: IngestResult) -> IngestResult:
        """Count and log ``result`` once :meth:`audit` has audited it."""
        return self._ingestor._count(result, self._source)

    def complete(self) -> IngestResult:
        """Check, commit and announce the data set, without reporting the outcome yet.

        A C-STORE's response waits on this and on the outcome's audit record (:meth:`audit`); its
        metrics and log follow the response (:meth:`report`), while the sender is already on its next
        instance.
        """
        writer = self._writer
        if writer is None:
            assert self._refused is not None
            return self._refused
        self._writer = None
        try:
            try:
                # The data set is checked as it lies in the temp file, in the page cache still.
                with writer.reopen() as fp:
                    checked = self._ingestor._check(fp, self._expected, self._data_set_at)
            except OSError as exc:
                return IngestResult(Outcome.NO_STORAGE, f"cannot read back the payload: {exc.strerror}",
                                    self._expected.sop_class_uid, self._expected.sop_instance_uid)
            if isinstance(checked, IngestResult):
                return checked
            found, ids = checked
            try:
                blob = writer.commit()
            except BlobStoreError as exc:
                return IngestResult(Outcome.NO_STORAGE, str(exc), **ids)
            return self._ingestor._announce(found, ids, blob, writer.existed, self._source)
        finally:
            writer.abort()


def _shorten(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

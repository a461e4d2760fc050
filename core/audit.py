"""Audit records (``dicom.audit``): who did what to which patient and study, from where, with what outcome.

Every record is a DICOM audit message (PS3.15 A.5): a coded EventID (and EventTypeCode where one applies,
DCM and IHE codes: :mod:`dicomgrid.core.audit_codes`), active participants with role codes and their AE
titles as AlternativeUserID, the audit source (the site), and participant objects: patients (ID and
name), studies (with their SOP classes and instances), queries (the query itself, base64) and payloads.
On Kafka a record is JSON (schemas/events/audit.schema.json); :func:`to_xml` renders the same record as
the standard's XML, which validates against its RELAX NG schema (schemas/audit/).

Delivery is at-least-once: a record is appended to the site's audit spool before it is published and
forgotten only once the brokers confirm it, so one that cannot reach Kafka (or whose process dies first)
is sent later (:mod:`dicomgrid.core.audit_spool`). The audit trail is where identities live: the process
log gets one line per record without patient data.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lxml import etree

from dicomgrid import schemas
from dicomgrid.core import audit_codes as codes
from dicomgrid.core import metrics
from dicomgrid.core.audit_spool import AuditSpool
from dicomgrid.core.events import envelope
from dicomgrid.core.kafka import EventPublisher
from dicomgrid.core.logging import get_logger

log = get_logger("dicomgrid.audit")

Action = Literal["C", "R", "U", "D", "E"]
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
ObjectType = Literal["patient", "study", "series", "instance", "query", "payload", "trial"]


class TransferredInstance(Protocol):
    """What an audit record names of an instance that was sent or received."""

    study_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Participant:
    """An active participant: a user, an AE, a site or a network peer."""

    user_id: str
    requestor: bool
    ae_title: str | None = None
    network_address: str | None = None
    role: str = "Application"

    def as_dict(self) -> dict[str, Any]:
        role = codes.ROLE_IDS.get(self.role)
        return {
            "user_id": self.user_id[:256],
            "ae_title": self.ae_title[:16] if self.ae_title else None,
            "network_address": self.network_address[:64] if self.network_address else None,
            "requestor": self.requestor,
            "role": self.role,
            "role_code": role.as_dict() if role else None,
        }


@dataclass(frozen=True)
class AuditObject:
    """A participant object: ``id`` is its key (patient ID, UID, digest); ``detail`` what else is known.

    Patient objects carry the name in ``detail["name"]``; query objects the query keys in ``detail``;
    instance objects their ``sop_class_uid`` (and ``study_uid`` when the record names several studies).
    """

    type: ObjectType
    id: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "id": self.id[:1024]}
        if self.detail:
            out["detail"] = self.detail
        return out


def patient_object(patient_id: str | None, name: str | None = None) -> list[AuditObject]:
    """The patient object of a record, or none when the patient is not known."""
    if not patient_id:
        return []
    return [AuditObject("patient", patient_id[:1024], {"name": name[:1024]} if name else {})]


# Audit records list at most this many instances; the study objects carry the full counts.
AUDIT_MAX_INSTANCES = 1000


def transfer_objects(
    instances: Iterable[TransferredInstance], patients: dict[str, tuple[str | None, str | None]] | None = None
) -> list[AuditObject]:
    """Audit objects of a transfer: the patients (``patients``: study UID -> (ID, name)), every study
    (with its instance count), then its instances."""
    instances = list(instances)
    per_study: dict[str, int] = {}
    for item in instances:
        per_study[item.study_uid] = per_study.get(item.study_uid, 0) + 1
    known = {patients[uid] for uid in per_study if patients and uid in patients}
    objects = [o for patient_id, name in sorted(known, key=str) for o in patient_object(patient_id, name)]
    objects += [AuditObject("study", uid, {"instances": count}) for uid, count in per_study.items()]
    objects += [
        AuditObject("instance", item.sop_instance_uid,
                    {"sop_class_uid": item.sop_class_uid, "study_uid": item.study_uid})
        for item in instances[:AUDIT_MAX_INSTANCES]
    ]
    return objects


def audited_patients(site: Any, instances: Iterable[TransferredInstance]) -> dict[str, tuple[str | None, str | None]]:
    """The patients of the studies of ``instances``, from the site's index; none if it cannot answer
    (the record then names the studies only, rather than not being written)."""
    try:
        return site.index.patients_of({i.study_uid for i in instances})
    except Exception as exc:
        log.warning("patients of an audited transfer not known: index unavailable", error=str(exc))
        return {}


@dataclass(frozen=True)
class AuditSource:
    """Who reports: the site (AuditSourceID) of the grid (AuditEnterpriseSiteID)."""

    site: str
    grid: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.site, "enterprise_site": self.grid, "type_code": codes.AUDIT_SOURCE_APPLICATION_SERVER}


def event_type(event: str, description: str = "") -> list[codes.Code]:
    """The EventTypeCode of an event, from what the record says it was (IHE transaction or DCM type)."""
    text = description.lower()
    if event == "Storage Commitment":
        return [codes.EVENT_TYPES["Storage Commitment"]]
    if event == "Application Activity":
        return [codes.EVENT_TYPES["Application Stop" if "stop" in text else "Application Start"]]
    if event == "Security Alert":
        return [codes.EVENT_TYPES["Node Authentication" if "association" in text or "tls" in text
                                  else "Use of Restricted Function"]]
    if event == "User Authentication":
        return [codes.EVENT_TYPES["Login"]]
    if event == "Query":
        return [codes.EVENT_TYPES["Query Images"]]
    if event in ("DICOM Instances Transferred", "Begin Transferring DICOM Instances"):
        for marker, name in (("wado-rs", "WADO-RS Retrieve"), ("wado-uri", "WADO Retrieve"),
                             ("stow", "Store Instances over the Web"), ("c-get", "Retrieve Images"),
                             ("c-move", "Retrieve Images")):
            if marker in text:
                return [codes.EVENT_TYPES[name]]
    return []


def audit_record(
    site: str,
    action: Action,
    event: str,
    outcome: int,
    description: str,
    participants: list[Participant],
    objects: list[AuditObject],
    *,
    source: AuditSource | None = None,
) -> dict[str, Any]:
    event_code = codes.EVENT_IDS.get(event)
    if event_code is None:
        raise ValueError(f"no DICOM EventID for audit event {event!r}")
    if event == "DICOM Instances Transferred" and action == "C" and not event_type(event, description):
        types = [codes.EVENT_TYPES["Modality Images Stored"]] if "dimse" in description.lower() else []
    else:
        types = event_type(event, description)
    return {
        **envelope(schemas.TOPIC_AUDIT),
        "site": site,
        "action": action,
        "event": event,
        "event_code": event_code.as_dict(),
        "event_type_codes": [t.as_dict() for t in types],
        "outcome": outcome,
        "outcome_description": description[:2048],
        "source": (source or AuditSource(site)).as_dict(),
        "participants": [p.as_dict() for p in participants],
        "objects": [o.as_dict() for o in objects],
    }


# -- the standard's XML ---------------------------------------------------------------------------------


def _coded(parent: etree._Element, tag: str, code: dict[str, str]) -> etree._Element:
    return etree.SubElement(parent, tag, {"csd-code": code["code"], "codeSystemName": code["system"],
                                          "originalText": code["meaning"]})


def _token(value: object) -> str:
    """An XML token (no leading, trailing or repeated white space, no control characters)."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return " ".join(text.split()) or "-"


def _time(iso: str) -> str:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).isoformat()


def _address_type(address: str) -> str:
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    return "2" if host.replace(".", "").isdigit() or ":" in host else "1"


def to_xml(record: dict[str, Any]) -> bytes:
    """The record as a DICOM audit message (PS3.15 A.5.1), UTF-8 XML."""
    root = etree.Element("AuditMessage")
    ident = etree.SubElement(root, "EventIdentification", {
        "EventActionCode": record["action"], "EventDateTime": _time(record["occurred_at"]),
        "EventOutcomeIndicator": str(record["outcome"]),
    })
    _coded(ident, "EventID", record["event_code"])
    for code in record.get("event_type_codes", []):
        _coded(ident, "EventTypeCode", code)
    if record.get("outcome_description"):
        etree.SubElement(ident, "EventOutcomeDescription").text = record["outcome_description"]
    for p in record["participants"]:
        attrs = {"UserID": p["user_id"] or "unknown", "UserIsRequestor": "true" if p["requestor"] else "false"}
        if p.get("ae_title"):
            attrs["AlternativeUserID"] = f"AETITLE={p['ae_title']}"
        if p.get("network_address"):
            host = p["network_address"].rsplit(":", 1)[0] if p["network_address"].count(":") == 1 \
                else p["network_address"]
            attrs["NetworkAccessPointID"] = _token(host)
            attrs["NetworkAccessPointTypeCode"] = _address_type(p["network_address"])
        element = etree.SubElement(root, "ActiveParticipant", attrs)
        if p.get("role_code"):
            _coded(element, "RoleIDCode", p["role_code"])
    source = record.get("source") or {"id": record["site"]}
    src_attrs = {"AuditSourceID": _token(source["id"])}
    if source.get("enterprise_site"):
        src_attrs["AuditEnterpriseSiteID"] = _token(source["enterprise_site"])
    src = etree.SubElement(root, "AuditSourceIdentification", src_attrs)
    etree.SubElement(src, "AuditSourceTypeCode", {"csd-code": source.get("type_code") or "4"})
    for element in _objects(record["objects"]):
        root.append(element)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _objects(objects: list[dict[str, Any]]) -> list[etree._Element]:
    studies = [o for o in objects if o["type"] == "study"]
    instances = [o for o in objects if o["type"] == "instance"]
    by_study: dict[str | None, list[dict[str, Any]]] = {}
    for inst in instances:
        study = inst.get("detail", {}).get("study_uid") or (studies[0]["id"] if len(studies) == 1 else None)
        by_study.setdefault(study, []).append(inst)
    out = []
    for obj in objects:
        kind, detail = obj["type"], obj.get("detail", {})
        if kind == "patient":
            element = _object(obj["id"], codes.PATIENT_NUMBER, codes.OBJECT_PERSON, codes.ROLE_PATIENT)
            etree.SubElement(element, "ParticipantObjectName").text = _token(detail.get("name") or obj["id"])
        elif kind == "study":
            element = _object(obj["id"], codes.STUDY_INSTANCE_UID, codes.OBJECT_SYSTEM, codes.ROLE_REPORT)
            _description(element, by_study.pop(obj["id"], []), detail.get("accession"))
        elif kind == "query":
            sop_class = detail.get("sop_class_uid") or obj["id"]
            element = _object(sop_class, codes.Code(sop_class, "1.2.840.10008.2.6.1", "Query model"),
                              codes.OBJECT_SYSTEM, codes.ROLE_QUERY)
            keys = {k: v for k, v in detail.items() if k != "sop_class_uid"}
            etree.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(
                json.dumps(keys, sort_keys=True, ensure_ascii=False).encode()).decode()
        elif kind == "payload":
            element = _object(obj["id"], codes.PAYLOAD_DIGEST, codes.OBJECT_SYSTEM, codes.ROLE_RESOURCE)
            etree.SubElement(element, "ParticipantObjectName").text = _token(obj["id"])
            for name, value in sorted(detail.items()):
                etree.SubElement(element, "ParticipantObjectDetail", {
                    "type": _token(name), "value": base64.b64encode(str(value).encode()).decode()})
        elif kind == "trial":
            element = _object(obj["id"], codes.TRIAL, codes.OBJECT_SYSTEM, codes.ROLE_DATA_DESTINATION)
            etree.SubElement(element, "ParticipantObjectName").text = _token(obj["id"])
        else:
            continue
        out.append(element)
    # Instances whose study the record does not name stand as objects of their SOP class.
    for study, orphans in by_study.items():
        if study is not None:
            element = _object(study, codes.STUDY_INSTANCE_UID, codes.OBJECT_SYSTEM, codes.ROLE_REPORT)
            _description(element, orphans, None)
            out.append(element)
            continue
        for sop_class in dict.fromkeys(o.get("detail", {}).get("sop_class_uid") or "unknown" for o in orphans):
            element = _object(sop_class, codes.SOP_CLASS_UID, codes.OBJECT_SYSTEM, codes.ROLE_RESOURCE)
            _description(element, [o for o in orphans
                                   if (o.get("detail", {}).get("sop_class_uid") or "unknown") == sop_class], None)
            out.append(element)
    return out


def _object(object_id: str, id_type: codes.Code, type_code: str, role: str) -> etree._Element:
    element = etree.Element("ParticipantObjectIdentification", {
        "ParticipantObjectID": _token(object_id), "ParticipantObjectTypeCode": type_code,
        "ParticipantObjectTypeCodeRole": role,
    })
    _coded(element, "ParticipantObjectIDTypeCode", id_type.as_dict())
    return element


def _description(element: etree._Element, instances: list[dict[str, Any]], accession: str | None) -> None:
    """The DICOM object description of a study: its accession number, SOP classes and instances."""
    if not instances and not accession:
        # The schema wants a name or a query of every object; a study's UID is its name.
        etree.SubElement(element, "ParticipantObjectName").text = _token(element.get("ParticipantObjectID"))
        return
    etree.SubElement(element, "ParticipantObjectName").text = _token(element.get("ParticipantObjectID"))
    description = etree.SubElement(element, "ParticipantObjectDescription")
    if accession:
        etree.SubElement(description, "Accession", {"Number": _token(accession)})
    per_class: dict[str, list[str]] = {}
    for inst in instances:
        per_class.setdefault(inst.get("detail", {}).get("sop_class_uid") or "unknown", []).append(inst["id"])
    for sop_class, uids in per_class.items():
        cls = etree.SubElement(description, "SOPClass", {"UID": _token(sop_class), "NumberOfInstances": str(len(uids))})
        for uid in uids:
            etree.SubElement(cls, "Instance", {"UID": _token(uid)})


# -- publishing -----------------------------------------------------------------------------------------

# Audit records are confirmed asynchronously, so their producer may wait this long to batch them; the
# instance events' producer does not.
AUDIT_LINGER_MS = 20
# How often records that did not reach Kafka are sent again.
RESEND_INTERVAL_S = 2.0


class AuditTrail:
    """Publishes a site's audit records without blocking the caller, at least once.

    Give it its own publisher (``linger_ms=AUDIT_LINGER_MS``): sharing the ingest publisher, whose
    ``linger.ms`` is 0, sends every audit record in a produce request of its own. With a ``spool``,
    every record is kept on the site's disk until Kafka confirms it, and sent again until it does.
    """

    def __init__(self, site: str, publisher: EventPublisher | None, *, spool: AuditSpool | None = None,
                 source: AuditSource | None = None, role: str = "") -> None:
        self.site = site
        self.role = role  # the kind of process (receiver, http, ...), for the spool depth metric
        self.source = source or AuditSource(site)
        self._publisher = publisher
        self._spool = spool
        self._stop = threading.Event()
        # Spool tokens of held records that an undelivered record stands for (see record(supersedes=)).
        self._superseded: dict[str, Sequence[str]] = {}
        self._superseded_lock = threading.Lock()
        # Open collections of held records (core.transfer_audit), sent by the resend loop once due.
        self._batches: weakref.WeakSet[Any] = weakref.WeakSet()
        if spool is not None and publisher is not None:
            self._resender = threading.Thread(target=self._resend_loop, name="audit-resend", daemon=True)
            self._resender.start()

    def record(
        self,
        action: Action,
        event: str,
        outcome: int,
        description: str,
        participants: list[Participant],
        objects: list[AuditObject] = (),  # type: ignore[assignment]
        *,
        supersedes: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Record an event: spooled, then published.

        ``supersedes``: spool tokens of :meth:`hold` records that this one covers; they are forgotten
        with it once Kafka confirms it.
        """
        record = audit_record(self.site, action, event, outcome, description, participants, list(objects),
                              source=self.source)
        # The log line says that something was audited, never about whom: identities stay in the trail.
        # Successes at debug: one info line per stored instance would be most of a busy site's log (and
        # a tenth of the receive path's CPU); the trail has them all.
        (log.debug if outcome == SUCCESS else log.info)(
            "audit", audit_event=event, action=action, outcome=outcome, audit_id=record["event_id"],
            objects=sorted({o.type for o in objects}))
        token = self._spool.append(record) if self._spool is not None else None
        if token is not None and supersedes:
            with self._superseded_lock:
                self._superseded[token] = supersedes
        if self._publisher is not None:
            self._send(record, token)
        return record

    def hold(self, action: Action, event: str, outcome: int, description: str, participants: list[Participant],
             objects: Iterable[AuditObject] = ()) -> str | None:
        """Spool the record :meth:`record` makes of the same arguments without publishing it; its token,
        for the record that will cover it (:meth:`record` with ``supersedes``). Should this process die
        first, the next one of the site adopts the spool and sends the held record itself, so what it
        says is never lost. None without a spool."""
        if self._spool is None:
            return None
        return self._spool.append(audit_record(self.site, action, event, outcome, description, participants,
                                               list(objects), source=self.source))

    def watch(self, batch: Any) -> None:
        """Have the resend loop call ``batch.flush(due_only=True)`` while ``batch`` lives (a collection of
        held records that must not wait on an idle association)."""
        self._batches.add(batch)

    def _send(self, record: dict[str, Any], token: Any) -> None:
        assert self._publisher is not None
        try:
            future = self._publisher.publish(schemas.TOPIC_AUDIT, self.site, record)
        except schemas.InvalidEvent as exc:
            log.error("audit record breaks its schema; kept in the spool", error=str(exc))
            return
        future.add_done_callback(lambda f: self._settled(f, token))

    def _settled(self, future: Any, token: Any) -> None:
        if future.exception() is None:
            if self._spool is not None and token is not None:
                with self._superseded_lock:
                    covered = self._superseded.pop(token, ())
                if covered:
                    self._spool.confirmed(token, covered)
                self._spool.delivered(token)
                for held in covered:
                    self._spool.delivered(held)
        elif self._spool is None:
            log.error("audit record not delivered to Kafka and no spool to keep it", error=str(future.exception()))
        else:
            if token is not None:
                self._spool.failed(token)
            log.warning("audit record not delivered to Kafka yet; kept in the spool", error=str(future.exception()))

    def _resend_loop(self) -> None:
        assert self._spool is not None and self._publisher is not None
        while not self._stop.wait(RESEND_INTERVAL_S):
            for batch in list(self._batches):
                try:
                    batch.flush(due_only=True)
                except Exception as exc:  # one batch's trouble must not stop the others or the resends
                    log.error("held audit records not sent", error=str(exc))
            try:
                self._spool.sync()
                for token, record in self._spool.undelivered():
                    self._send(record, token)
                metrics.AUDIT_SPOOL_DEPTH.labels(self.site, self.role).set(self._spool.pending())
            except Exception as exc:  # a damaged spool line must not stop the others
                log.error("audit spool resend failed", error=str(exc))

    def flush(self, timeout: float = 5.0) -> None:
        """Publish the open collections (:meth:`watch`), then wait for queued records to be delivered (at
        shutdown); what is not delivered stays in the spool."""
        for batch in list(self._batches):
            try:
                batch.flush()
            except Exception as exc:  # the others, and what is queued, still go
                log.error("held audit records not sent", error=str(exc))
        if self._publisher is not None:
            self._publisher.flush(timeout)
        if self._spool is not None:
            self._spool.sync()

    def close(self, timeout: float = 5.0) -> None:
        """Flush, then release the trail's publisher: it is the trail's own (:func:`~dicomgrid.core.site.open_site`),
        and one left open keeps a poll thread and reconnects to the brokers for as long as the process lives."""
        self._stop.set()
        self.flush(timeout)
        if self._publisher is not None:
            self._publisher.close(timeout)

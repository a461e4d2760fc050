"""Audit records (``dicom.audit``): who did what to which study, from where, with what outcome.

Records follow the shape of the DICOM audit message (PS3.15 A.5). They are published asynchronously
and also written to the process log, so an unreachable broker never hides an audit trail completely.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from dicomgrid import schemas
from dicomgrid.core.events import envelope
from dicomgrid.core.kafka import EventPublisher
from dicomgrid.core.logging import get_logger

log = get_logger("dicomgrid.audit")

Action = Literal["C", "R", "U", "D", "E"]
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12


class TransferredInstance(Protocol):
    """What an audit record names of an instance that was sent or received."""

    study_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Participant:
    user_id: str
    requestor: bool
    ae_title: str | None = None
    network_address: str | None = None
    role: str = "Application"

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id[:256],
            "ae_title": self.ae_title[:16] if self.ae_title else None,
            "network_address": self.network_address,
            "requestor": self.requestor,
            "role": self.role,
        }


@dataclass(frozen=True)
class AuditObject:
    type: Literal["patient", "study", "series", "instance", "query", "payload"]
    id: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "id": self.id[:1024]}
        if self.detail:
            out["detail"] = self.detail
        return out


# Audit records list at most this many instances; the study objects carry the full counts.
AUDIT_MAX_INSTANCES = 1000


def transfer_objects(instances: "Iterable[TransferredInstance]") -> list[AuditObject]:
    """Audit objects of a transfer: every study (with its instance count), then its instances."""
    instances = list(instances)
    per_study: dict[str, int] = {}
    for item in instances:
        per_study[item.study_uid] = per_study.get(item.study_uid, 0) + 1
    objects = [AuditObject("study", uid, {"instances": count}) for uid, count in per_study.items()]
    objects += [
        AuditObject("instance", item.sop_instance_uid, {"sop_class_uid": item.sop_class_uid})
        for item in instances[:AUDIT_MAX_INSTANCES]
    ]
    return objects


def audit_record(
    site: str,
    action: Action,
    event: str,
    outcome: int,
    description: str,
    participants: list[Participant],
    objects: list[AuditObject],
) -> dict[str, Any]:
    return {
        **envelope(schemas.TOPIC_AUDIT),
        "site": site,
        "action": action,
        "event": event,
        "outcome": outcome,
        "outcome_description": description[:2048],
        "participants": [p.as_dict() for p in participants],
        "objects": [o.as_dict() for o in objects],
    }


# Audit records are confirmed asynchronously (a lost one is logged, and every record is also a log
# line), so their producer may wait this long to batch them; the instance events' producer does not.
AUDIT_LINGER_MS = 20


class AuditTrail:
    """Publishes audit records for one site without blocking the caller.

    Give it its own publisher (``linger_ms=AUDIT_LINGER_MS``): sharing the ingest publisher, whose
    ``linger.ms`` is 0, sends every audit record in a produce request of its own.
    """

    def __init__(self, site: str, publisher: EventPublisher | None) -> None:
        self.site = site
        self._publisher = publisher

    def record(
        self,
        action: Action,
        event: str,
        outcome: int,
        description: str,
        participants: list[Participant],
        objects: list[AuditObject] = (),  # type: ignore[assignment]
    ) -> dict[str, Any]:
        record = audit_record(self.site, action, event, outcome, description, participants, list(objects))
        log.info(
            "audit",
            audit_event=event,
            action=action,
            outcome=outcome,
            description=record["outcome_description"],
            participants=[p.user_id for p in participants],
            objects=[f"{o.type}:{o.id}" for o in objects],
            audit_id=record["event_id"],
        )
        if self._publisher is not None:
            future = self._publisher.publish(schemas.TOPIC_AUDIT, self.site, record)
            future.add_done_callback(_log_lost_audit)
        return record


    def flush(self, timeout: float = 5.0) -> None:
        """Wait for queued records to be delivered (at shutdown)."""
        if self._publisher is not None:
            self._publisher.flush(timeout)


def _log_lost_audit(future: Any) -> None:
    if future.exception() is not None:
        log.error("audit record not delivered to Kafka; the log line above is its copy", error=str(future.exception()))

"""One audit record for what an association (or a STOW-RS request) stored, rather than one per instance.

A DICOM Instances Transferred message names a study with its SOP classes and instances (PS3.15 A.5.3.2),
so an archive audits a transfer as a whole: dcm4chee-arc writes one record per association and study.
One per instance made the audit trail most of the grid's work per stored instance: a Kafka message, a
link of the chain and half a dozen look-up rows in Cassandra for every CT slice.

Nothing is given up for it. Each instance's own record is *held* in the site's audit spool when its
C-STORE succeeds (:meth:`~dicomgrid.core.audit.AuditTrail.hold`): written, not published. The record that
covers them is published when the association ends, when :data:`AUDIT_MAX_INSTANCES` are waiting (so
every instance is listed), or :data:`MAX_HOLD_S` after the first of them (an association left open
between studies). When Kafka confirms it, the held records are forgotten. A receiver that dies before
then leaves them in its spool; the next process of the site adopts the spool and publishes each held
record as it is. A crash can so make two records of one store, never none.

Refusals and failures are not collected: each is audited at once, on its own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from dicomgrid.core.audit import (
    AUDIT_MAX_INSTANCES,
    SUCCESS,
    AuditObject,
    AuditTrail,
    Participant,
    transfer_objects,
)
from dicomgrid.core.events import Source

# The longest a stored instance waits for the record that covers it to be published.
MAX_HOLD_S = 5.0


def store_participants(site: str, source: Source) -> list[Participant]:
    """The sender (requestor) and the receiving site of a store."""
    return [
        Participant(source.calling_ae or "unknown", True, source.calling_ae, source.peer_address, "Source"),
        Participant(site, False, source.called_ae, None, "Destination"),
    ]


@dataclass(frozen=True)
class _Stored:
    study_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient: tuple[str | None, str | None]
    duplicate: bool
    token: str | None


class StoreAudit:
    """The successful stores of one association or request, audited together; thread-safe."""

    def __init__(self, trail: AuditTrail, site: str, source: Source) -> None:
        self._trail = trail
        self._site = site
        self._source = source
        self._lock = threading.Lock()
        self._pending: list[_Stored] = []
        self._first_at = 0.0
        trail.watch(self)

    def add(self, *, study_uid: str, sop_instance_uid: str, sop_class_uid: str,
            patient: tuple[str | None, str | None], duplicate: bool, description: str,
            objects: list[AuditObject]) -> None:
        """A stored instance; ``description`` and ``objects`` make its own record, held until the
        collected one is confirmed."""
        token = self._trail.hold("C", "DICOM Instances Transferred", SUCCESS, description,
                                 store_participants(self._site, self._source), objects)
        with self._lock:
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append(_Stored(study_uid, sop_instance_uid, sop_class_uid, patient, duplicate, token))
            full = len(self._pending) >= AUDIT_MAX_INSTANCES
        if full:
            self.flush()

    def flush(self, *, due_only: bool = False) -> None:
        """Publish the record of what was collected (with ``due_only``, only once it has waited
        :data:`MAX_HOLD_S`)."""
        with self._lock:
            if not self._pending or (due_only and time.monotonic() - self._first_at < MAX_HOLD_S):
                return
            stored, self._pending = self._pending, []
        patients: dict[str, tuple[str | None, str | None]] = {}
        for item in stored:
            patients.setdefault(item.study_uid, item.patient)
        duplicates = sum(item.duplicate for item in stored)
        description = f"{self._source.protocol} stored: {len(stored)} instance{'s' if len(stored) != 1 else ''}"
        if duplicates:
            description += f" ({duplicates} already stored, identical bytes)"
        self._trail.record(
            "C", "DICOM Instances Transferred", SUCCESS, description,
            store_participants(self._site, self._source),
            transfer_objects(stored, patients),
            supersedes=[item.token for item in stored if item.token is not None],
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


"""One audit record for a run of instances transferred together, rather than one per instance.

A DICOM Instances Transferred message names a study with its SOP classes and instances (PS3.15 A.5.3.2),
so an archive audits a transfer as a whole: dcm4chee-arc writes one record per association and study.
One per instance made the audit trail most of the grid's work per transferred instance: a Kafka
message, a link of the chain and half a dozen look-up rows in Cassandra (in every datacenter) for every
CT slice. The grid collects the stores of an association or a STOW-RS request
(:mod:`dicomgrid.producers.store_audit`), the replicas a site's worker fetched from one peer
(:mod:`dicomgrid.processors.replicator`) and the payloads a site sent to one peer
(:class:`dicomgrid.core.transfer_endpoint.TransferEndpoint`, which knows payloads by digest, not instances).

Nothing is given up for it. Each instance's own record is *held* in the site's audit spool when its
transfer succeeds (:meth:`~dicomgrid.core.audit.AuditTrail.hold`): written, not published. The record
that covers them is published when the collector is flushed (the association ends), when
:data:`AUDIT_MAX_INSTANCES` are waiting (so every instance is listed), or :data:`MAX_HOLD_S` after the
first of them (the audit resend loop flushes an idle collector). When Kafka confirms it, the held
records are forgotten. A process that dies before then leaves them in its spool; the next process of
the site adopts the spool and publishes each held record as it is. A crash can so make two records of
one transfer, never none.

Refusals and failures are not collected: each is audited at once, on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from dicomgrid.core.audit import (
    AUDIT_MAX_INSTANCES,
    SUCCESS,
    Action,
    AuditObject,
    AuditTrail,
    Participant,
    transfer_objects,
)

# The longest a transferred instance waits for the record that covers it to be published.
MAX_HOLD_S = 5.0


@dataclass(frozen=True)
class _Transferred:
    study_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    patient: tuple[str | None, str | None]
    duplicate: bool
    token: str | None
    payload: AuditObject | None = None


class TransferAudit:
    """Successful transfers between the same participants, audited together; thread-safe.

    ``action`` is the records' EventActionCode. ``what`` starts the collected record's description
    (``"DIMSE stored"``: "DIMSE stored: 12 instances"); ``duplicate`` transfers are counted in it as
    "already stored, identical bytes".
    """

    def __init__(self, trail: AuditTrail, participants: list[Participant], what: str, action: Action = "C") -> None:
        self._trail = trail
        self._action = action  # C: the site received them (created); R: it sent them (read)
        self._participants = participants
        self._what = what
        self._lock = threading.Lock()
        self._pending: list[_Transferred] = []
        self._first_at = 0.0
        trail.watch(self)

    def add(self, *, study_uid: str, sop_instance_uid: str, sop_class_uid: str,
            patient: tuple[str | None, str | None] = (None, None), duplicate: bool = False,
            description: str, objects: list[AuditObject]) -> None:
        """A transferred instance; ``description`` and ``objects`` make its own record, held until the
        collected one is confirmed."""
        self._add(_Transferred(study_uid, sop_instance_uid, sop_class_uid, patient, duplicate,
                               self._hold(description, objects)))

    def add_payload(self, payload: AuditObject, *, description: str) -> None:
        """A transferred payload known by its digest only (``payload``: its audit object, named as it
        is in the collected record); its own record holds just that object."""
        self._add(_Transferred(None, None, None, (None, None), False, self._hold(description, [payload]), payload))

    def _hold(self, description: str, objects: list[AuditObject]) -> str | None:
        return self._trail.hold(self._action, "DICOM Instances Transferred", SUCCESS, description,
                                self._participants, objects)

    def _add(self, item: _Transferred) -> None:
        with self._lock:
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append(item)
            full = len(self._pending) >= AUDIT_MAX_INSTANCES
        if full:
            self.flush()

    def flush(self, *, due_only: bool = False) -> None:
        """Publish the record of what was collected (with ``due_only``, only once it has waited
        :data:`MAX_HOLD_S`)."""
        with self._lock:
            if not self._pending or (due_only and time.monotonic() - self._first_at < MAX_HOLD_S):
                return
            done, self._pending = self._pending, []
        instances = [item for item in done if item.sop_instance_uid is not None]
        patients: dict[str, tuple[str | None, str | None]] = {}
        for item in instances:
            if item.patient != (None, None):
                patients.setdefault(item.study_uid, item.patient)  # type: ignore[arg-type]
        duplicates = sum(item.duplicate for item in done)
        noun = "instance" if instances else "payload"
        description = f"{self._what}: {len(done)} {noun}{'s' if len(done) != 1 else ''}"
        if duplicates:
            description += f" ({duplicates} already stored, identical bytes)"
        payloads = [item.payload for item in done if item.payload is not None]
        self._trail.record(
            self._action, "DICOM Instances Transferred", SUCCESS, description, self._participants,
            transfer_objects(instances, patients) + payloads[:AUDIT_MAX_INSTANCES],  # type: ignore[arg-type]
            supersedes=[item.token for item in done if item.token is not None],
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


class TransferAudits:
    """One :class:`TransferAudit` per peer (any hashable key), made by ``make`` on first use; thread-safe.
    What they collected is published with the trail's other open collections
    (:meth:`~dicomgrid.core.audit.AuditTrail.flush`)."""

    def __init__(self, make: Callable[[Hashable], TransferAudit]) -> None:
        self._make = make
        self._by_key: dict[Hashable, TransferAudit] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: Hashable) -> TransferAudit:
        with self._lock:
            collected = self._by_key.get(key)
            if collected is None:
                collected = self._by_key[key] = self._make(key)
            return collected

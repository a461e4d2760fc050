"""The grid at a glance, for `dicomgrid status` and each site's status page: services, ingest rate,
replication lag, under-replicated instances, recent audit events.

Everything comes from what any host of the grid can read (the supervisor's records, the event log, the
ledger, the audit log), so it also answers while a service it describes is down. Each part that cannot
be read is reported as such, and the rest is still shown.

Audit events are shown without their patient and query objects unless the caller asks for them (the
status page does so only for a viewer holding the audit scope): identities live in the audit trail.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dicomgrid import schemas
from dicomgrid.core.audit_log import AuditLog
from dicomgrid.core.config import GridConfig
from dicomgrid.core.ledger import ReplicaLedger
from dicomgrid.core.logging import get_logger
from dicomgrid.processors.replication_status import TopicReader, replication_status

log = get_logger(__name__)

INGEST_WINDOW_S = 300.0
AUDIT_SHOWN = 20
# Object types that can identify a patient (patients, queries with their keys, trial releases).
_IDENTIFYING = {"patient", "query", "trial"}


@dataclass
class ServiceState:
    name: str
    state: str  # UP, STARTING, DOWN
    pid: int | None
    restarts: int
    detail: str


@dataclass
class GridStatus:
    grid: str
    generated_at: str
    services: list[ServiceState] = field(default_factory=list)
    ingest_per_s: float | None = None
    ingest_window_s: float = INGEST_WINDOW_S
    replication: dict[str, Any] | None = None
    recent_audit: list[dict[str, Any]] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # part -> why it could not be read

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str)

    def render(self) -> str:
        lines = []
        rate = "unknown" if self.ingest_per_s is None else f"{self.ingest_per_s:.2f} instances/s"
        lines.append(f"ingest: {rate} over the last {self.ingest_window_s / 60:.0f} min")
        if self.replication is not None:
            worst = [s["lag_p99_s"] for s in self.replication["sites"] if s["lag_p99_s"] is not None]
            pending = sum(s["pending"] for s in self.replication["sites"])
            failed = sum(s["failed"] for s in self.replication["sites"])
            more = "at least " if self.replication["truncated"] else ""
            lines.append(
                f"replication: {pending} pending, {failed} failed, lag p99 "
                + (f"{max(worst):.2f} s" if worst else "-")
                + f"; under-replicated (< {self.replication['min_copies']} copies): {more}"
                f"{self.replication['under_replicated']}"
            )
        for part, why in self.unavailable.items():
            lines.append(f"{part}: unavailable ({why})")
        return "\n".join(lines)


def service_states(statuses: list[Any]) -> list[ServiceState]:
    """The supervisor's view of the services (:meth:`dicomgrid.supervisor.Supervisor.status`)."""
    return [
        ServiceState(e.service.name, "UP" if e.healthy else ("STARTING" if e.running else "DOWN"), e.pid,
                     e.restarts, e.detail)
        for e in statuses
    ]


def audit_summary(record: dict[str, Any], *, with_identities: bool) -> dict[str, Any]:
    """What the status page shows of an audit record: identities only ``with_identities``."""
    requestors = [p for p in record.get("participants", []) if p.get("requestor")]
    objects = record.get("objects", [])
    shown = [o for o in objects if with_identities or o["type"] not in _IDENTIFYING]
    summary = {
        "occurred_at": record.get("occurred_at"),
        "site": record.get("site"),
        "event": record.get("event"),
        "action": record.get("action"),
        "outcome": record.get("outcome"),
        "by": [p.get("ae_title") or p.get("user_id") for p in requestors],
        "objects": {t: sum(1 for o in objects if o["type"] == t) for t in sorted({o["type"] for o in objects})},
    }
    if with_identities:
        summary["description"] = record.get("description")
        summary["identities"] = [{"type": o["type"], "id": o["id"], **o.get("detail", {})}
                                 for o in shown if o["type"] in _IDENTIFYING]
    return summary


def collect(
    config: GridConfig,
    ledger: ReplicaLedger | None,
    audit_log: AuditLog | None,
    services: list[ServiceState] | None = None,
    *,
    with_identities: bool = False,
    window_s: float = 900.0,
) -> GridStatus:
    status = GridStatus(config.name, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), services or [])
    try:
        reader = TopicReader(config)
        try:
            count = reader.count_since(schemas.TOPIC_INSTANCE_STORED, INGEST_WINDOW_S)
        finally:
            reader.close()
        status.ingest_per_s = count / INGEST_WINDOW_S
    except Exception as exc:
        status.unavailable["ingest"] = _why(exc)
    if ledger is not None:
        try:
            status.replication = asdict(replication_status(config, ledger, window_s=window_s))
        except Exception as exc:
            status.unavailable["replication"] = _why(exc)
    if audit_log is not None:
        try:
            entries = [e for site in config.sites for e in audit_log.recent(site.name, AUDIT_SHOWN)]
            entries.sort(key=lambda e: e.occurred_at, reverse=True)
            status.recent_audit = [audit_summary(e.decoded(), with_identities=with_identities)
                                   for e in entries[:AUDIT_SHOWN]]
        except Exception as exc:
            status.unavailable["audit"] = _why(exc)
    return status


def _why(exc: Exception) -> str:
    log.warning("status part unavailable", error=str(exc)[:300])
    return f"{type(exc).__name__}: {exc}"[:300]

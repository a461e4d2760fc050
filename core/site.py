"""What the services of one site share: config, index, replica ledger, blob store, audit trail."""

from __future__ import annotations

from dataclasses import dataclass

from dicomgrid.core.audit import AUDIT_LINGER_MS, SUCCESS, AuditSource, AuditTrail, Participant
from dicomgrid.core.audit_spool import AuditSpool
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.config import GridConfig, SiteConfig
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.kafka import EventPublisher
from dicomgrid.core.ledger import ReplicaLedger


@dataclass
class SiteContext:
    config: GridConfig
    site: SiteConfig
    db: Cassandra
    blobs: BlobStore
    audit: AuditTrail
    # Events the site's services publish besides audit records (e.g. dicom.replica.stored).
    publisher: EventPublisher | None = None

    def __post_init__(self) -> None:
        self.index = IndexReader(self.db)
        self.ledger = ReplicaLedger(self.db)

    def application_activity(self, service: str, *, started: bool) -> None:
        """Audit a service of the site starting or stopping (Application Activity, Application Start/Stop)."""
        me = self.site
        self.audit.record(
            "E", "Application Activity", SUCCESS, f"{service} {'started' if started else 'stopping'}",
            [Participant(f"{me.name}/{service}", False, me.ae_title, None, "Application")],
        )

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is still queued (events, audit records) and let go of the connections."""
        if self.publisher is not None:
            self.publisher.close(timeout)
        self.audit.close(timeout)
        self.db.close()


def open_site(config: GridConfig, site_name: str, role: str, db: Cassandra | None = None) -> SiteContext:
    """Everything one of ``site_name``'s processes needs, for a process doing ``role`` (e.g. "receiver").

    The Cassandra connection is made on first use, so a service starts while the metadata store is
    down. Audit records get a publisher of their own that batches them (``linger.ms``); the event
    publisher does not wait, so whoever waits for an event's confirmation (ingest) pays no batching delay.
    """
    # Its producers use the site's own Kafka cluster (the grid's shared one unless the site names one).
    config = config.for_site(site_name)
    site = config.site(site_name)
    blobs = BlobStore(config.site_storage(site.name), site.name)
    # Every process of a site starts by clearing what crashed writers left (only files idle long enough
    # not to be another process's write in progress).
    blobs.clear_tmp(idle_s=config.healing.tmp_idle_s)
    audit = AuditTrail(
        site.name,
        EventPublisher(config.kafka, client_id=f"dicomgrid-{role}-audit-{site.name}", linger_ms=AUDIT_LINGER_MS),
        spool=AuditSpool(blobs.root / "audit-spool"),
        source=AuditSource(site.name, config.name),
        role=role,
    )
    return SiteContext(
        config, site, db or Cassandra(config, local_dc=site.cassandra_dc),
        blobs, audit,
        EventPublisher(config.kafka, client_id=f"dicomgrid-{role}-{site.name}"),
    )

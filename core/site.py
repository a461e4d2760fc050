"""What the services of one site share: config, index, replica ledger, blob store, audit trail."""

from __future__ import annotations

from dataclasses import dataclass

from dicomgrid.core.audit import AuditTrail
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

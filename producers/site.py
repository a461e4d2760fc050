"""Assembles a site's ingest path from the grid config."""

from __future__ import annotations

from dicomgrid.core.audit import AUDIT_LINGER_MS, AuditTrail
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.config import GridConfig
from dicomgrid.core.kafka import EventPublisher
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.site import SiteContext
from dicomgrid.producers.ingest import Ingestor


def build_ingestor(config: GridConfig, site_name: str, db: Cassandra | None = None) -> Ingestor:
    """The ingest path of ``site_name``: its blob store, an event publisher and an index reader.

    The index is only consulted to recognise re-sent instances; while Cassandra is unreachable the site
    still ingests (Kafka is the durability boundary).
    """
    site = config.site(site_name)
    publisher = EventPublisher(config.kafka, client_id=f"dicomgrid-ingest-{site.name}")
    db = db or Cassandra(config, local_dc=site.cassandra_dc)
    return Ingestor(
        site.name,
        BlobStore(config.site_storage(site.name), site.name),
        publisher,
        db,
        AuditTrail(site.name, EventPublisher(config.kafka, client_id=f"dicomgrid-audit-{site.name}",
                                             linger_ms=AUDIT_LINGER_MS)),
        max_instance_bytes=site.max_instance_bytes,
        delivery_timeout_s=config.kafka.delivery_timeout_s,
    )


def build_site_context(config: GridConfig, site_name: str, ingestor: Ingestor) -> SiteContext:
    """What the site's query/retrieve services share with its ingest path."""
    assert ingestor.db is not None
    return SiteContext(
        config, config.site(site_name), ingestor.db, ingestor.blobs, ingestor.audit, ingestor.publisher
    )

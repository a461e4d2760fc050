"""Assembles a site's ingest path from the grid config."""

from __future__ import annotations

from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.config import GridConfig
from dicomgrid.core.kafka import EventPublisher
from dicomgrid.core.logging import get_logger
from dicomgrid.core.metadata import MetadataStore
from dicomgrid.producers.ingest import Ingestor

log = get_logger(__name__)


def build_ingestor(config: GridConfig, site_name: str, *, with_metadata: bool = True) -> Ingestor:
    """The ingest path of ``site_name``: its blob store, an event publisher and an index reader.

    The index is only consulted to recognise re-sent instances; when Cassandra is unreachable at start
    the site still ingests (Kafka is the durability boundary) and says so in the log.
    """
    site = config.site(site_name)
    publisher = EventPublisher(config.kafka, client_id=f"dicomgrid-ingest-{site.name}")
    metadata = None
    if with_metadata:
        try:
            metadata = MetadataStore(config, local_dc=site.cassandra_dc)
        except Exception as exc:  # NoHostAvailable and friends
            log.warning("metadata store unreachable; re-sent instances may produce duplicate events", error=str(exc))
    return Ingestor(
        site.name,
        BlobStore(config.site_storage(site.name), site.name),
        publisher,
        metadata,
        AuditTrail(site.name, publisher),
        max_instance_bytes=site.max_instance_bytes,
        delivery_timeout_s=config.kafka.delivery_timeout_s,
    )

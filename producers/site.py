"""Assembles a site's ingest path from its site context."""

from __future__ import annotations

from dicomgrid.core.site import SiteContext
from dicomgrid.producers.ingest import Ingestor


def build_ingestor(site: SiteContext) -> Ingestor:
    """The ingest path of a site: its blob store, event publisher, index (to recognise re-sent
    instances; while Cassandra is unreachable the site still ingests: Kafka is the durability boundary)
    and audit trail."""
    assert site.publisher is not None
    return Ingestor(
        site.site.name, site.blobs, site.publisher, site.db, site.audit,
        max_instance_bytes=site.site.max_instance_bytes,
        delivery_timeout_s=site.config.kafka.delivery_timeout_s,
    )

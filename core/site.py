"""What the services of one site share: config, index, blob store, audit trail."""

from __future__ import annotations

from dataclasses import dataclass

from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.config import GridConfig, SiteConfig
from dicomgrid.core.metadata import MetadataStore


@dataclass
class SiteContext:
    config: GridConfig
    site: SiteConfig
    metadata: MetadataStore
    blobs: BlobStore
    audit: AuditTrail

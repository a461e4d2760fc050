"""The replication policy: which sites an instance's payload must be copied to.

Every instance stored at a site is copied to each site in that site's ``replicate_to``; it counts as
safe once ``min_copies`` sites hold a verified copy (the config refuses a policy that cannot get there).
"""

from __future__ import annotations

from typing import Any

from dicomgrid.core.config import GridConfig
from dicomgrid.core.events import InstanceRef, replication_requested
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)


def targets(config: GridConfig, event: dict[str, Any]) -> list[str]:
    """The sites a ``dicom.instance.stored`` event's payload goes to."""
    origin = event["payload"]["site"]
    try:
        site = config.site(origin)
    except KeyError:
        # A site that has left the grid: its copy stays where it is; nothing names where else to put it.
        log.warning("instance stored at a site this grid does not configure; not replicated", site=origin)
        return []
    return [name for name in dict.fromkeys(site.replicate_to) if name != origin]


def replication_requests(config: GridConfig, event: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``dicom.replication.requested`` per target site of a ``dicom.instance.stored`` event."""
    instance = InstanceRef.of_event(event)
    return [
        replication_requested(event["payload"], target, instance, cause_event_id=event["event_id"])
        for target in targets(config, event)
    ]

"""The replication policy: which sites an instance's payload must be copied to.

Every instance stored at a site is copied to each site in that site's ``replicate_to``; it counts as
safe once ``min_copies`` sites hold a verified copy (the config refuses a policy that cannot get there).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dicomgrid.core.config import GridConfig
from dicomgrid.core.events import InstanceRef, replication_requested
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)


def targets(config: GridConfig, origin: str) -> list[str]:
    """The sites a payload received at ``origin`` is copied to."""
    try:
        site = config.site(origin)
    except KeyError:
        # A site that has left the grid: its copy stays where it is; nothing names where else to put it.
        log.warning("instance stored at a site this grid does not configure; not replicated", site=origin)
        return []
    return [name for name in dict.fromkeys(site.replicate_to) if name != origin]


def replicates(config: GridConfig) -> bool:
    """Whether any site of the grid copies what it receives to another site."""
    return any(targets(config, site.name) for site in config.sites)


def replication_requests(config: GridConfig, event: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``dicom.replication.requested`` per target site of a ``dicom.instance.stored`` event."""
    instance = InstanceRef.of_event(event)
    return [
        replication_requested(event["payload"], target, instance, cause_event_id=event["event_id"])
        for target in targets(config, event["payload"]["site"])
    ]


def holders(config: GridConfig, origin: str) -> set[str]:
    """Every site that should hold a copy of what ``origin`` received."""
    return {origin, *targets(config, origin)}


@dataclass(frozen=True)
class Holding:
    """A payload a site should hold, by the policy: which instance it is and where it arrived."""

    sha256: str
    size: int | None
    instance: InstanceRef
    origin: str


def holdings(config: GridConfig, index: IndexReader, site: str) -> Iterator[Holding]:
    """Every payload ``site`` should hold (every version of every indexed instance, by the policy).

    A full scan of the index's versions: for healing jobs (recovery, anti-entropy, scrub), not for
    anything on a request path.
    """
    by_origin = {s.name: holders(config, s.name) for s in config.sites}
    for row in index.all_versions():
        if row.sha256 and site in by_origin.get(row.received_site, {row.received_site}):
            yield Holding(row.sha256, row.size, InstanceRef(row.study_uid, row.sop_instance_uid), row.received_site)

"""The indexer: ``dicom.instance.stored`` -> Cassandra (patient/study/series/instance levels).

Delivery is at-least-once, so everything here is an idempotent upsert; study and series aggregates are
recomputed once per study per batch, from the rows themselves. Events arrive validated against their
schema (:mod:`dicomgrid.processors.dead_letters`).
"""

from __future__ import annotations

from typing import Any

from dicomgrid.core.logging import get_logger
from dicomgrid.core.index_writer import IndexWriter

log = get_logger(__name__)


class Indexer:
    def __init__(self, writer: IndexWriter) -> None:
        self.writer = writer

    def apply(self, events: list[dict[str, Any]]) -> int:
        """Index a batch of events; returns how many studies were refreshed."""
        numbered = self.writer.index_instances(events)
        # Per study: the SOP classes the batch adds, or None when a version replaced an instance (its
        # class may have gone from the study, so the set is read again from the rows).
        studies: dict[str, set[str] | None] = {}
        for item in numbered:
            uid = item.event["study"]["uid"]
            seen = studies.setdefault(uid, set())
            if item.replaced:
                studies[uid] = None
            elif seen is not None:
                seen.add(item.event["instance"]["sop_class_uid"])
        for uid, sop_classes in studies.items():
            self.writer.refresh_study(uid, sop_classes)
        if events:
            log.info("indexed", instances=len(events), studies=len(studies))
        return len(studies)

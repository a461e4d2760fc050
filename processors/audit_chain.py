"""The audit chain builder: ``dicom.audit`` -> each site's hash chain in Cassandra (:mod:`dicomgrid.core.audit_log`).

It runs beside the indexer in the processors' consumer group. Records are keyed by site, so one
partition carries all of a site's records in order, and whoever owns that partition extends that site's
chain. A record delivered twice (the audit spool sends again what Kafka did not confirm) is chained once;
every ``CHECKPOINT_EVERY`` records, and when the builder stops, the chain's end is signed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomgrid.core.audit_log import CHECKPOINT_EVERY, AuditLog, Conflict, Head
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

# The chain's end is signed at least this often while records arrive.
CHECKPOINT_AFTER_S = 60.0


class ChainBuilder:
    def __init__(self, store: AuditLog, key: Ed25519PrivateKey) -> None:
        self.store = store
        self.key = key
        self._heads: dict[str, Head] = {}
        self._signed_at: dict[str, float] = {}

    def forget(self) -> None:
        """Partitions moved: another builder may have extended any chain meanwhile."""
        self._heads.clear()

    def apply(self, records: Sequence[dict[str, Any]]) -> int:
        """Chain a batch of records (in the order they came); returns how many were new."""
        per_site: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            per_site.setdefault(record["site"], []).append(record)
        added = 0
        for site, batch in per_site.items():
            seen = self.store.seen(uuid.UUID(r["event_id"]) for r in batch)
            fresh = list({r["event_id"]: r for r in batch if uuid.UUID(r["event_id"]) not in seen}.values())
            if not fresh:
                continue
            for _ in range(5):
                head = self._heads.get(site) or self.store.head(site)
                try:
                    self._heads[site] = self.store.append(site, head, fresh)
                    break
                except Conflict:
                    log.warning("audit chain extended elsewhere; reloading its end", site=site)
                    self._heads.pop(site, None)
            else:
                raise Conflict(f"audit chain of site {site} kept moving")
            added += len(fresh)
            self._maybe_sign(site)
        return added

    def _maybe_sign(self, site: str, *, now: bool = False) -> None:
        head = self._heads.get(site)
        if head is None or head.since_checkpoint == 0:
            return
        due = head.since_checkpoint >= CHECKPOINT_EVERY or \
            time.monotonic() - self._signed_at.get(site, 0.0) >= CHECKPOINT_AFTER_S
        if now or due:
            self._heads[site] = self.store.checkpoint(site, head, self.key)
            self._signed_at[site] = time.monotonic()

    def sign_all(self) -> None:
        for site in list(self._heads):
            self._maybe_sign(site, now=True)

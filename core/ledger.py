"""The replica ledger: which site holds a verified copy of which payload (table ``replicas``).

It is the grid's truth about where every copy lives. Ingest's copy is recorded by the indexer (the
receiving site hashed the bytes as it wrote them); every other copy by whoever made it: the replication
worker, or a retrieve that repaired a missing or corrupt local copy from a peer. Rows are upserts keyed
by (digest, site), so recording a copy twice leaves one row.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicomgrid.core.blobstore import BlobRef
from dicomgrid.core.cassandra import Cassandra, PartitionWrites, Write

# Digests per look-up query of verified_sites_of (partition keys in one IN).
LOOKUP_SLICE = 100

_INSERT = (
    "INSERT INTO replicas (sha256, site, size, payload_uri, stored_at, verified_at) VALUES (?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True)
class Replica:
    """One site's copy of a payload; ``verified_at`` is when its bytes last hashed to its digest."""

    sha256: str
    site: str
    size: int | None
    stored_at: dt.datetime | None
    verified_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: Any) -> "Replica":
        return cls(row.sha256, row.site, row.size, row.stored_at, row.verified_at)


def replica_write(db: Cassandra, blob: BlobRef, stored_at: dt.datetime, verified_at: dt.datetime | None) -> Write:
    """The upsert of one copy, for callers that batch it with other writes (the indexer)."""
    return db.write(_INSERT, (blob.sha256, blob.site, blob.size, blob.uri, stored_at, verified_at))


@dataclass
class _Queued:
    """A row waiting in :meth:`ReplicaLedger.record`'s queue."""

    write: Write
    sha256: str
    settled: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # Set instead of settled: the caller is to send the queue (the one sending it has finished a round).
    lead: bool = False


class ReplicaLedger:
    def __init__(self, db: Cassandra) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._queue: list[_Queued] = []
        self._sending = False

    def record(self, blob: BlobRef, verified_at: dt.datetime | None = None) -> None:
        """Record ``blob.site``'s copy, verified now unless told otherwise; return once Cassandra has it.

        Concurrent callers (the replication worker's threads) share requests, as a group commit: a row
        recorded while another caller's request is in flight waits for that request, then goes with
        every row queued meanwhile, in one unlogged batch per replica set (:class:`PartitionWrites`).
        A caller alone sends its row at once, so nobody waits for company. The caller whose request
        returns hands the next one to a caller still waiting, so none sends more than one round for
        the others. If a request fails, every caller whose row it carried gets the error.
        """
        now = dt.datetime.now(dt.timezone.utc)
        queued = _Queued(replica_write(self.db, blob, now, verified_at or now), blob.sha256)
        with self._lock:
            self._queue.append(queued)
            lead = not self._sending
            self._sending = True
        while True:
            if lead:
                self._send_round()
            queued.settled.wait()
            if not queued.lead:
                break
            queued.lead, lead = False, True
            queued.settled.clear()
        if queued.error is not None:
            raise queued.error

    def record_many(self, blobs: Sequence[BlobRef]) -> None:
        """:meth:`record` of several copies, verified now: one round of their own, whoever else records."""
        if not blobs:
            return
        now = dt.datetime.now(dt.timezone.utc)
        writes = PartitionWrites()
        for blob in blobs:
            writes.add(blob.sha256, replica_write(self.db, blob, now, now))
        futures = [self.db.session.execute_async(stmt, params) for stmt, params in writes.statements(self.db.replicas)]
        for future in futures:
            future.result()

    def _send_round(self) -> None:
        with self._lock:
            rows, self._queue = self._queue, []
        error: BaseException | None = None
        try:
            writes = PartitionWrites()
            for row in rows:
                writes.add(row.sha256, row.write)
            for stmt, params in writes.statements(self.db.replicas):
                self.db.session.execute(stmt, params)
        except BaseException as exc:  # handed to every caller whose row this round carried
            error = exc
        for row in rows:
            row.error = error
            row.settled.set()
        with self._lock:
            if self._queue:
                nxt = self._queue[0]
                nxt.lead = True
                nxt.settled.set()
            else:
                self._sending = False

    def replicas(self, sha256: str) -> list[Replica]:
        return [Replica.from_row(row) for row in self.db.execute(
            "SELECT sha256, site, size, stored_at, verified_at FROM replicas WHERE sha256 = ?", (sha256,)
        )]

    def all_replicas(self) -> Iterable[Replica]:
        """Every copy the ledger knows of (a full scan, page by page: for healing jobs only)."""
        for row in self.db.paged("SELECT sha256, site, size, stored_at, verified_at FROM replicas", [()], 1000):
            yield Replica.from_row(row)

    def mark_verified(self, blob: BlobRef) -> None:
        """A copy found intact again (scrub): its ``verified_at`` moves to now, ``stored_at`` stays."""
        self.db.execute(
            "UPDATE replicas SET verified_at = ?, size = ?, payload_uri = ? WHERE sha256 = ? AND site = ?",
            (dt.datetime.now(dt.timezone.utc), blob.size, blob.uri, blob.sha256, blob.site),
        )

    def mark_unverified(self, sha256: str, site: str) -> None:
        """A copy found missing or corrupt and not repaired: it no longer counts as held."""
        self.db.execute("UPDATE replicas SET verified_at = null WHERE sha256 = ? AND site = ?", (sha256, site))

    def verified_sites(self, sha256: str) -> set[str]:
        """Sites whose copy of ``sha256`` has been verified."""
        return {r.site for r in self.replicas(sha256) if r.verified_at is not None}

    def verified_sites_of(self, digests: Sequence[str]) -> dict[str, set[str]]:
        """:meth:`verified_sites` of many payloads (each digest a key, with an empty set if none), in
        partition-key ``IN`` queries of :data:`LOOKUP_SLICE` digests sent at once: a healing job that
        asked once per payload spent most of a sweep on the round trips."""
        stmt = self.db.prepare("SELECT sha256, site, verified_at FROM replicas WHERE sha256 IN ?")
        digests = list(dict.fromkeys(digests))
        futures = [self.db.session.execute_async(stmt, (digests[start:start + LOOKUP_SLICE],))
                   for start in range(0, len(digests), LOOKUP_SLICE)]
        out: dict[str, set[str]] = {digest: set() for digest in digests}
        for future in futures:
            for row in future.result():
                if row.verified_at is not None:
                    out[row.sha256].add(row.site)
        return out

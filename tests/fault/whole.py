"""The invariant every fault scenario ends with: the grid is whole again.

Every instance that got 0x0000 is stored, byte-identical, at ``min_copies`` sites (at every site the
policy names), its copies are verified in the ledger, and it is indexed in every datacenter; and no
instance that was never acknowledged exists anywhere (no event, no index row, no copy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pydicom.dataset import Dataset

from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.ledger import ReplicaLedger
from dicomgrid.processors.replication_policy import holders
from tests.grid import wait_for


def _copies_whole(grid, readers: dict[str, IndexReader], ledger: ReplicaLedger, ds: Dataset) -> str | None:
    """None when the instance is whole; otherwise what is still missing (for the failure message)."""
    locations = {dc: reader.instance_location(ds.SOPInstanceUID) for dc, reader in readers.items()}
    if any(location is None for location in locations.values()):
        return f"not indexed in {[dc for dc, loc in locations.items() if loc is None]}"
    digests = {loc.sha256 for loc in locations.values()}
    if len(digests) != 1:
        return f"datacenters disagree on its payload: {digests}"
    (digest,) = digests
    # The location row is also written at ingest; the instance row only by the indexer.
    rows = {dc: reader.instance_row(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            for dc, reader in readers.items()}
    if any(row is None or row.sha256 != digest for row in rows.values()):
        return f"instance row missing or stale in {[dc for dc, row in rows.items() if row is None or row.sha256 != digest]}"
    expected = holders(grid.config, next(iter(rows.values())).received_site)
    copies = {}
    for site in expected:
        path = BlobStore(grid.config.site_storage(site), site).path(digest)
        if not path.is_file():
            return f"no copy at site {site}"
        copies[site] = path.read_bytes()
    if len(set(copies.values())) != 1 or hashlib.sha256(next(iter(copies.values()))).hexdigest() != digest:
        return "copies differ or do not match their digest"
    verified = ledger.verified_sites(digest)
    if not expected <= verified or len(verified) < grid.config.min_copies:
        return f"ledger lists verified copies at {sorted(verified)}, policy wants {sorted(expected)}"
    return None


def assert_whole(grid, acknowledged: Iterable[Dataset], refused: Iterable[Dataset] = (), timeout: float = 120.0) -> None:
    acknowledged, refused = list(acknowledged), list(refused)
    dbs = {dc: Cassandra(grid.config, local_dc=dc) for dc in grid.config.cassandra.replication}
    readers = {dc: IndexReader(db) for dc, db in dbs.items()}
    ledger = ReplicaLedger(dbs["dc1"])
    try:
        pending = {ds.SOPInstanceUID: ds for ds in acknowledged}

        def whole() -> bool:
            for uid, ds in list(pending.items()):
                if _copies_whole(grid, readers, ledger, ds) is None:
                    del pending[uid]
            return not pending

        try:
            wait_for(whole, timeout=timeout, interval=1.0)
        except AssertionError:
            missing = {uid: _copies_whole(grid, readers, ledger, ds) for uid, ds in pending.items()}
            raise AssertionError(f"{len(missing)} acknowledged instance(s) not whole: {missing}") from None
        # The acknowledged instances are whole, so anything refused would have surfaced by now too.
        for ds in refused:
            for dc, reader in readers.items():
                assert reader.instance_location(ds.SOPInstanceUID) is None, \
                    f"{ds.SOPInstanceUID} was never acknowledged but is indexed in {dc}"
    finally:
        for db in dbs.values():
            db.close()

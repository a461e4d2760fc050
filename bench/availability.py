"""When has an instance stored at site A become available at site B? One probe per way of asking.

The cross-site section (:mod:`bench.replication`) stores instances at A and, for each, asks probes in
turn until each answers yes (:func:`watch`); a new way of asking is one more class here and one more
entry in :func:`probes`:

* :class:`IndexAtSite` - a site's C-FIND finds the instance (IMAGE level, by SOPInstanceUID): the index
  (metadata) has reached that site's datacenter.
* :class:`ReplicaAtSite` - B's ``replicas`` ledger lists a copy at B with ``verified_at``: the payload is
  replicated (fetched, SHA-256-verified, fsynced, announced by ``dicom.replica.stored``, then recorded).

Site B's WADO-RS is not a probe: since replication exists, a WADO-RS asked before the copy arrives would
fetch the payload from A on demand and record that repair in the ledger, which would then be mistaken
for a replicated copy.

:class:`Ledger` reads when B's rows were written (``WRITETIME(verified_at)``) for many payloads at once,
after the fact: how the sections time copies made while site A ingests a stream, when polling every
instance would load the machine it measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cassandra.concurrent import execute_concurrent_with_args

from bench.corpus import InstanceKey
from bench.dimse_clients import FindClient, instance_query
from bench.grid import BenchGrid, BenchSite
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.index_reader import IndexReader

POLL_S = 0.005  # pause between two rounds of probes (each probe is itself a round trip)
_VERIFIED = "SELECT sha256, verified_at, WRITETIME(verified_at) AS written FROM replicas WHERE sha256 = ? AND site = ?"


@dataclass(frozen=True)
class SentInstance:
    key: InstanceKey
    path: Path
    stored_at: float  # time.monotonic() of its C-STORE success response at site A


class Probe(Protocol):
    key: str  # in the JSON
    title: str  # in the tables
    path: str  # "metadata" or "payload": what becoming available means for this probe
    sampled: bool  # asked for a sample of the instances only

    def available(self, item: SentInstance) -> bool: ...

    def close(self) -> None: ...


class IndexAtSite:
    path, sampled = "metadata", False

    def __init__(self, grid: BenchGrid, site: BenchSite) -> None:
        self.key = f"index-{site.name}"
        self.title = f"C-FIND at site {site.name} (IMAGE level, by SOPInstanceUID)"
        self._client = FindClient("127.0.0.1", grid.ports[site.name].dicom, site.ae_title).__enter__()

    def available(self, item: SentInstance) -> bool:
        key = item.key
        return self._client.find(instance_query(key.study_uid, key.series_uid, key.sop_instance_uid)).matches > 0

    def close(self) -> None:
        self._client.__exit__()


class Ledger:
    """One site's rows of the ``replicas`` ledger, read in that site's datacenter (as its services do)."""

    def __init__(self, grid: BenchGrid, site: BenchSite) -> None:
        self.site = site.name
        self.index = IndexReader(Cassandra(grid.config(), local_dc=site.dc))

    @property
    def db(self) -> Cassandra:
        return self.index.db

    def digest_of(self, sop_instance_uid: str) -> str | None:
        row = self.index.instance_location(sop_instance_uid)
        return None if row is None else row.sha256

    def verified_written(self, digest: str) -> float | None:
        """When the site's verified row for ``digest`` was written (time.time() seconds), or None."""
        row = self.db.execute(_VERIFIED, (digest, self.site)).one()
        return None if row is None or row.verified_at is None else row.written / 1e6

    def verified_written_many(self, digests: list[str]) -> dict[str, float]:
        """:meth:`verified_written` of many digests at once; those without a verified row are left out."""
        statement = self.db.prepare(_VERIFIED)
        results = execute_concurrent_with_args(self.db.session, statement, [(d, self.site) for d in digests],
                                               concurrency=32, raise_on_first_error=True)
        out = {}
        for result in results:
            for row in result.result_or_exc:
                if row.verified_at is not None:
                    out[row.sha256] = row.written / 1e6
        return out

    def close(self) -> None:
        self.db.close()


class ReplicaAtSite:
    path, sampled = "payload", False

    def __init__(self, grid: BenchGrid, site: BenchSite) -> None:
        self.key = f"replica-{site.name}"
        self.title = f"`replicas` row with `verified_at` for site {site.name} (payload replicated)"
        self.ledger = Ledger(grid, site)
        self._digests: dict[str, str] = {}
        self.written: dict[str, float] = {}  # SOP Instance UID -> when its verified row was written

    def available(self, item: SentInstance) -> bool:
        uid = item.key.sop_instance_uid
        if uid not in self._digests:
            digest = self.ledger.digest_of(uid)
            if digest is None:
                return False
            self._digests[uid] = digest
        written = self.ledger.verified_written(self._digests[uid])
        if written is None:
            return False
        self.written[uid] = written
        return True

    def close(self) -> None:
        self.ledger.close()


def probes(grid: BenchGrid, site: BenchSite) -> list[Probe]:
    """Every way of asking ``site`` for an instance."""
    return [IndexAtSite(grid, site), ReplicaAtSite(grid, site)]


@dataclass(frozen=True)
class Watch:
    lags_s: dict[str, float | None]  # per probe: C-STORE success until its first yes (None: not in time)
    rounds: int  # times every pending probe was asked
    round_s: float  # mean duration of a round: the resolution of the lags


def watch(probes: list[Probe], item: SentInstance, timeout_s: float, since: float | None = None) -> Watch:
    """Ask every probe in turn, round after round, until each has answered yes or ``timeout_s`` has passed
    since ``since`` (default: the instance's C-STORE success). A lag is taken when the yes arrives, so it
    over-states the true one by at most a round."""
    start = item.stored_at if since is None else since
    pending, lags, rounds = list(probes), {}, 0
    began = time.monotonic()
    while pending:
        rounds += 1
        for probe in list(pending):
            if probe.available(item):
                lags[probe.key] = time.monotonic() - item.stored_at
                pending.remove(probe)
        if pending and time.monotonic() - start > timeout_s:
            lags.update({probe.key: None for probe in pending})
            break
        if pending:
            time.sleep(POLL_S)
    return Watch(lags, rounds, (time.monotonic() - began) / rounds)

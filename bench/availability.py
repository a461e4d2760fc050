"""When has an instance stored at site A become available at site B? One probe per way of asking.

The cross-site section (:mod:`bench.replication`) stores instances at A and, for each, asks probes in
turn until each answers yes (:func:`watch`); a probe is all it knows about a path, so a new path (the
payload replication service, once it exists) is one more class here and one more entry in
:func:`probes`:

* :class:`IndexAtSite` - B's C-FIND finds the instance (IMAGE level, by SOPInstanceUID): the index
  (metadata) has reached B's datacenter. This is what exists today.
* :class:`WadoAtSite` - B's WADO-RS returns the instance. B has no copy of the payload, so this is B
  finding the instance in its index and fetching the payload from A on demand (and keeping it).
* :class:`ReplicaAtSite` - B's ``replicas`` ledger lists a copy at B: what payload replication will
  write once it lands. Until then no row appears and the section says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench import wado
from bench.corpus import InstanceKey
from bench.dimse_clients import FindClient, instance_query
from bench.grid import BenchGrid, BenchSite
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.index_reader import IndexReader

POLL_S = 0.005  # pause between two rounds of probes (each probe is itself a round trip)


@dataclass(frozen=True)
class SentInstance:
    key: InstanceKey
    path: Path
    stored_at: float  # time.monotonic() of its C-STORE success response at site A


class Probe(Protocol):
    key: str  # in the JSON
    title: str  # in the tables
    path: str  # "metadata" or "payload": what becoming available means for this probe
    sampled: bool  # asked for a sample of the instances only (costly: e.g. it moves the payload)

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


class WadoAtSite:
    path, sampled = "payload", True

    def __init__(self, grid: BenchGrid, site: BenchSite) -> None:
        self.key = f"wado-{site.name}"
        self.title = f"WADO-RS at site {site.name} (payload fetched from A on demand)"
        self._root = f"http://127.0.0.1:{grid.ports[site.name].http}/dicomweb"
        self._http = wado.client()

    def available(self, item: SentInstance) -> bool:
        key = item.key
        url = (f"{self._root}/studies/{key.study_uid}/series/{key.series_uid}"
               f"/instances/{key.sop_instance_uid}")
        result = wado.retrieve(self._http, url)
        if result.status not in (200, 404):
            raise RuntimeError(f"WADO-RS at {self._root} answered HTTP {result.status} for {key.sop_instance_uid}")
        return result.status == 200 and result.parts == 1

    def close(self) -> None:
        self._http.close()


class ReplicaAtSite:
    path, sampled = "payload", False

    def __init__(self, grid: BenchGrid, site: BenchSite) -> None:
        self.key = f"replica-{site.name}"
        self.title = f"`replicas` row for site {site.name} (payload replicated)"
        self.site = site.name
        # Site B's view of the ledger: read in B's datacenter.
        self._store = IndexReader(Cassandra(grid.config(), local_dc=site.dc))
        self._digests: dict[str, str] = {}

    def available(self, item: SentInstance) -> bool:
        uid = item.key.sop_instance_uid
        if uid not in self._digests:
            row = self._store.instance_location(uid)
            if row is None:
                return False
            self._digests[uid] = row.sha256
        return self._store.db.execute("SELECT site FROM replicas WHERE sha256 = ? AND site = ?",
                                   (self._digests[uid], self.site)).one() is not None

    def close(self) -> None:
        self._store.db.close()


def probes(grid: BenchGrid, site: BenchSite) -> list[Probe]:
    """Every way of asking ``site`` for an instance. The ledger is asked before WADO-RS, whose on-demand
    fetch leaves a copy at the site that must not be mistaken for a replicated one."""
    return [IndexAtSite(grid, site), ReplicaAtSite(grid, site), WadoAtSite(grid, site)]


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

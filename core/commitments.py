"""Storage Commitment transactions in Cassandra (tables ``storage_commitments``, ``storage_commitments_open``)
and the index reads that decide whether an instance is committed.

A transaction is written when its N-ACTION is accepted, before the response, so it outlives the
receiver process that accepted it. Each site's receivers share the work through a lease: the row
names its ``owner`` and ``lease_until``; the owner renews the lease while it waits for the ledger,
and another receiver (or the owner's own restart) claims a transaction whose lease has run out. Every
change after the insert is a lightweight transaction conditioned on owner and state, at LOCAL_SERIAL:
a transaction belongs to one site, whose receivers all use its datacenter, so the claim needs no other
datacenter to be up.

The state goes ``pending`` -> ``reporting`` (the result is fixed, with the row, before the first
delivery attempt) -> ``reported`` or ``undeliverable``. Only one owner can move a transaction out of
``pending``, so the result is decided and sent once; a receiver that dies during delivery leaves a
``reporting`` transaction that the next owner sends again with the same result (a lost report would
leave the requestor waiting; a repeated one carries the same Transaction UID and content).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cassandra import ConsistencyLevel

from dicomgrid.core.cassandra import Cassandra

PENDING, REPORTING, REPORTED, UNDELIVERABLE = "pending", "reporting", "reported", "undeliverable"
FINAL_STATES = frozenset({REPORTED, UNDELIVERABLE})

# Index reads in flight at once when the instances of a large transaction are looked up.
LOOKUP_SLICE = 256

_KEY = "grid = ? AND site = ? AND transaction_uid = ?"
_COLUMNS = (
    "grid, site, transaction_uid, requestor_ae, requestor_address, items, requested_at, deadline, state, owner, "
    "lease_until, result, report_attempts, reported_at, note"
)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # The driver returns timestamps as naive UTC datetimes.
    return value.replace(tzinfo=dt.timezone.utc) if value is not None and value.tzinfo is None else value


def _millis(value: dt.datetime) -> dt.datetime:
    """``value`` at Cassandra's timestamp precision, so what is kept equals what is read back."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def new_owner_id() -> str:
    """Names one receiver process for as long as it runs (a restart is a new owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, order=True)
class Reference:
    """One Referenced SOP Sequence item: an instance the requestor wants committed."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Failure:
    reference: Reference
    reason: int  # Failure Reason (0008,1197), PS3.4 Table J.3-2


@dataclass(frozen=True)
class CommitmentResult:
    """What the N-EVENT-REPORT says: committed instances and failed ones with their reasons."""

    committed: tuple[Reference, ...] = ()
    failed: tuple[Failure, ...] = ()

    @property
    def event_type(self) -> int:
        """1: every instance committed; 2: some (or all) failed."""
        return 2 if self.failed else 1

    def to_json(self) -> str:
        return json.dumps({
            "committed": [[r.sop_class_uid, r.sop_instance_uid] for r in self.committed],
            "failed": [[f.reference.sop_class_uid, f.reference.sop_instance_uid, f.reason] for f in self.failed],
        })

    @classmethod
    def from_json(cls, text: str) -> "CommitmentResult":
        data = json.loads(text)
        return cls(
            tuple(Reference(c, i) for c, i in data["committed"]),
            tuple(Failure(Reference(c, i), int(reason)) for c, i, reason in data["failed"]),
        )


def items_to_json(items: Sequence[Reference]) -> str:
    return json.dumps([[r.sop_class_uid, r.sop_instance_uid] for r in items])


def items_from_json(text: str) -> tuple[Reference, ...]:
    return tuple(Reference(c, i) for c, i in json.loads(text))


@dataclass(frozen=True)
class Transaction:
    grid: str
    site: str
    uid: str
    requestor_ae: str
    requestor_address: str
    items: tuple[Reference, ...]
    requested_at: dt.datetime
    deadline: dt.datetime
    state: str = PENDING
    owner: str | None = None
    lease_until: dt.datetime | None = None
    result: CommitmentResult | None = None
    report_attempts: int = 0
    reported_at: dt.datetime | None = None
    note: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def same_request(self, other: "Transaction") -> bool:
        """Whether ``other`` asks for exactly this (a requestor repeating an N-ACTION it got no answer to)."""
        return (self.grid, self.site, self.uid, self.requestor_ae, self.items) == (
            other.grid, other.site, other.uid, other.requestor_ae, other.items
        )

    @classmethod
    def from_row(cls, row: Any) -> "Transaction":
        return cls(
            row.grid, row.site, row.transaction_uid, row.requestor_ae, row.requestor_address or "",
            items_from_json(row.items), _aware(row.requested_at), _aware(row.deadline), row.state, row.owner,
            _aware(row.lease_until), CommitmentResult.from_json(row.result) if row.result else None,
            row.report_attempts or 0, _aware(row.reported_at), row.note,
        )


@dataclass(frozen=True)
class OpenEntry:
    transaction_uid: str
    created_at: dt.datetime | None


def _applied(result: Any) -> bool:
    # The session's row factory is the grid's own, which the driver's ``was_applied`` refuses; the
    # first column of an LWT's answer is "[applied]".
    row = result.one()
    return bool(row[0]) if row is not None else False


class TransactionStore:
    """One receiver process's access to its site's transactions (of the grid named ``grid``), as ``owner``."""

    def __init__(self, db: Cassandra, grid: str, site: str, owner: str, lease_s: float) -> None:
        self.db = db
        self.grid = grid
        self.site = site
        self.owner = owner
        self.lease = dt.timedelta(seconds=lease_s)

    def _lwt(self, cql: str, params: tuple[Any, ...]) -> bool:
        bound = self.db.prepare(cql).bind(params)
        bound.serial_consistency_level = ConsistencyLevel.LOCAL_SERIAL
        return _applied(self.db.session.execute(bound))

    def _lease_from(self, now: dt.datetime) -> dt.datetime:
        return _millis(now + self.lease)

    # -- accepting ---------------------------------------------------------------------------------

    def open(self, tx: Transaction) -> Transaction | None:
        """Keep a newly accepted transaction, owned by this process; None if it is new, else the
        transaction already kept under its UID (nothing is written over it).

        The open-transactions row is written first: a process that dies between the two writes leaves
        an entry without a transaction (removed by :meth:`forget`), never a transaction nobody finds.
        """
        self.reopen(tx)
        bound = self.db.prepare(
            f"INSERT INTO storage_commitments ({_COLUMNS}) VALUES ({', '.join('?' * 15)}) IF NOT EXISTS"
        ).bind((
            tx.grid, tx.site, tx.uid, tx.requestor_ae, tx.requestor_address, items_to_json(tx.items),
            _millis(tx.requested_at), _millis(tx.deadline), tx.state, tx.owner, tx.lease_until, None, 0, None, None,
        ))
        bound.serial_consistency_level = ConsistencyLevel.LOCAL_SERIAL
        row = self.db.session.execute(bound).one()
        if row[0]:
            return None
        # A failed IF NOT EXISTS answers with the existing row's columns after "[applied]".
        return self.load(tx.uid)

    def new_transaction(
        self, uid: str, requestor_ae: str, requestor_address: str, items: Sequence[Reference],
        now: dt.datetime, timeout_s: float,
    ) -> Transaction:
        now = _millis(now)
        return Transaction(
            self.grid, self.site, uid, requestor_ae, requestor_address, tuple(items), now,
            _millis(now + dt.timedelta(seconds=timeout_s)), PENDING, self.owner, self._lease_from(now),
        )

    def reopen(self, tx: Transaction) -> None:
        """Make sure an unfinished transaction is listed as open (a repeated N-ACTION)."""
        self.db.execute(
            "INSERT INTO storage_commitments_open (grid, site, transaction_uid, created_at) VALUES (?, ?, ?, ?)",
            (tx.grid, tx.site, tx.uid, _millis(tx.requested_at)),
        )

    # -- finding work ------------------------------------------------------------------------------

    def open_entries(self) -> list[OpenEntry]:
        rows = self.db.execute(
            "SELECT transaction_uid, created_at FROM storage_commitments_open WHERE grid = ? AND site = ?",
            (self.grid, self.site),
        )
        return [OpenEntry(r.transaction_uid, _aware(r.created_at)) for r in rows]

    def load(self, uid: str) -> Transaction | None:
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM storage_commitments WHERE grid = ? AND site = ? AND transaction_uid = ?",
            (self.grid, self.site, uid),
        ).one()
        return Transaction.from_row(row) if row is not None else None

    def forget(self, uid: str) -> None:
        """Drop a transaction from the open list (finished, or an entry whose N-ACTION never completed)."""
        self.db.execute(
            "DELETE FROM storage_commitments_open WHERE grid = ? AND site = ? AND transaction_uid = ?",
            (self.grid, self.site, uid),
        )

    # -- owning ------------------------------------------------------------------------------------

    def claim(self, tx: Transaction, now: dt.datetime) -> Transaction | None:
        """Take over an unfinished transaction whose lease has run out; the claimed transaction, or None
        if another receiver holds it (or it changed since it was read)."""
        lease = self._lease_from(now)
        if self._lwt(
            f"UPDATE storage_commitments SET owner = ?, lease_until = ? WHERE {_KEY} IF state = ? AND lease_until < ?",
            (self.owner, lease, self.grid, self.site, tx.uid, tx.state, _millis(now)),
        ):
            return replace(tx, owner=self.owner, lease_until=lease)
        return None

    def renew(self, uid: str, now: dt.datetime) -> dt.datetime | None:
        """Extend this process's lease; the new expiry, or None if the transaction is no longer ours."""
        lease = self._lease_from(now)
        if self._lwt(
            f"UPDATE storage_commitments SET lease_until = ? WHERE {_KEY} IF owner = ?",
            (lease, self.grid, self.site, uid, self.owner),
        ):
            return lease
        return None

    def release(self, uid: str, now: dt.datetime) -> bool:
        """Give up the lease at once (orderly shutdown), so another receiver need not wait it out."""
        return self._lwt(
            f"UPDATE storage_commitments SET lease_until = ? WHERE {_KEY} IF owner = ?",
            (_millis(now), self.grid, self.site, uid, self.owner),
        )

    def begin_report(self, uid: str, result: CommitmentResult) -> bool:
        """Fix the result; true only for the one owner that moves the transaction out of ``pending``."""
        return self._lwt(
            "UPDATE storage_commitments SET state = ?, result = ? WHERE grid = ? AND site = ? AND transaction_uid = ? "
            "IF owner = ? AND state = ?",
            (REPORTING, result.to_json(), self.grid, self.site, uid, self.owner, PENDING),
        )

    def finish(self, uid: str, state: str, attempts: int, now: dt.datetime, note: str | None = None) -> bool:
        """Record how the report went (``reported`` or ``undeliverable``) and close the transaction."""
        assert state in FINAL_STATES
        applied = self._lwt(
            "UPDATE storage_commitments SET state = ?, report_attempts = ?, reported_at = ?, note = ? "
            f"WHERE {_KEY} IF owner = ? AND state = ?",
            (state, attempts, _millis(now), note, self.grid, self.site, uid, self.owner, REPORTING),
        )
        if applied:
            self.forget(uid)
        return applied


# -- what the index and the ledger say about an instance ---------------------------------------------


@dataclass(frozen=True)
class StoredState:
    """An instance the index knows: its stored SOP class (None until the indexer has written its row)
    and the sites holding a verified copy of its current payload."""

    sop_class_uid: str | None
    sha256: str
    verified_sites: frozenset[str] = field(default_factory=frozenset)


def _slices(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


class InstanceStates:
    """Reads, for many SOP Instance UIDs at once, what decides whether each is committed.

    The same tables as :class:`~dicomgrid.core.index_reader.IndexReader` and
    :class:`~dicomgrid.core.ledger.ReplicaLedger` read (``instance_locations``, ``instances``,
    ``replicas``, with "verified" meaning a ``verified_at``), but each step for a whole slice of
    instances in parallel, so a study of thousands of images is checked in a few round trips.
    """

    def __init__(self, db: Cassandra) -> None:
        self.db = db

    def lookup(self, sop_instance_uids: Iterable[str]) -> dict[str, StoredState]:
        """The states of the instances the index knows; an unknown UID has no entry."""
        uids = list(dict.fromkeys(sop_instance_uids))
        out: dict[str, StoredState] = {}
        for chunk in _slices(uids, LOOKUP_SLICE):
            out.update(self._lookup(chunk))
        return out

    def _lookup(self, uids: Sequence[str]) -> dict[str, StoredState]:
        locations = {
            row.sop_instance_uid: row
            for row in self.db.paged(
                "SELECT sop_instance_uid, study_uid, series_uid, sha256 FROM instance_locations "
                "WHERE sop_instance_uid = ?",
                [(u,) for u in uids], LOOKUP_SLICE,
            )
        }
        if not locations:
            return {}
        classes = {
            row.sop_instance_uid: row.sop_class_uid
            for row in self.db.paged(
                "SELECT sop_instance_uid, sop_class_uid FROM instances "
                "WHERE study_uid = ? AND series_uid = ? AND sop_instance_uid = ?",
                [(loc.study_uid, loc.series_uid, uid) for uid, loc in locations.items()], LOOKUP_SLICE,
            )
        }
        digests = list(dict.fromkeys(loc.sha256 for loc in locations.values() if loc.sha256))
        verified: dict[str, set[str]] = {d: set() for d in digests}
        for row in self.db.paged(
            "SELECT sha256, site, verified_at FROM replicas WHERE sha256 = ?", [(d,) for d in digests], LOOKUP_SLICE
        ):
            if row.verified_at is not None:
                verified[row.sha256].add(row.site)
        return {
            uid: StoredState(classes.get(uid), loc.sha256, frozenset(verified.get(loc.sha256, ())))
            for uid, loc in locations.items()
            if loc.sha256
        }

"""The audit trail kept in Cassandra: append-only, one hash chain per site, with signed checkpoints.

Each site's records are chained in the order the chain builder takes them from ``dicom.audit`` (keyed by
site, so one partition holds a site's records in order): record *n* is stored with the hash of record
*n-1*, and its own hash is ``sha256(prev_hash + canonical JSON of the record)``. Every so often the
chain's hash at a sequence number is signed (Ed25519) with the grid's audit key. A record changed,
removed or moved afterwards breaks a link (or, if the attacker recomputed the hashes, a signature);
:func:`verify` names the first record where that happens.

Appending a batch is one conditional batch on the month's partition (``IF NOT EXISTS`` on each
sequence number), so two builders that briefly both think they own a site's chain (a rebalance) cannot
both write record *n*: the loser reloads the head and goes on from there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement, BatchType
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomgrid.core.cassandra import Cassandra, PartitionWrites
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

GENESIS = "0" * 64
# A checkpoint is signed after this many records of a site (and when the builder stops).
CHECKPOINT_EVERY = 100
# Record ids per look-up of those already chained.
SEEN_SLICE = 100


def canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def link(prev_hash: str, text: str) -> str:
    return hashlib.sha256((prev_hash + text).encode()).hexdigest()


def month_of(iso: str) -> str:
    return iso[:7]


# -- the signing key ------------------------------------------------------------------------------------


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The grid's audit signing key, created (readable by its owner only) if it does not exist yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        log.info("audit signing key created", key_id=key_id(key.public_key()))
        return key
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return loaded


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _signed_text(site: str, seq: int, digest: str) -> bytes:
    return f"dicomgrid-audit|{site}|{seq}|{digest}".encode()


# -- the store ------------------------------------------------------------------------------------------


@dataclass
class Head:
    seq: int = 0
    hash: str = GENESIS
    month: str | None = None
    since_checkpoint: int = 0


@dataclass(frozen=True)
class Entry:
    site: str
    seq: int
    occurred_at: dt.datetime
    event_id: uuid.UUID
    record: str
    prev_hash: str
    hash: str

    def decoded(self) -> dict[str, Any]:
        return json.loads(self.record)


class Conflict(RuntimeError):
    """Another builder appended to the site's chain first."""


class AuditLog:
    def __init__(self, db: Cassandra) -> None:
        self.db = db

    # -- building --------------------------------------------------------------------------------------

    def head(self, site: str) -> Head:
        """Where the site's chain ends, found again from the log itself (a builder may have died between
        appending a batch and moving the head)."""
        row = self.db.execute("SELECT seq, hash, month FROM audit_heads WHERE site = ?", (site,)).one()
        head = Head(row.seq, row.hash, row.month) if row else Head()
        if head.month is None:
            months = self.months(site)
            if not months:
                return head
            head.month = months[-1]
        while True:
            later = list(self.db.execute(
                "SELECT seq, hash FROM audit_log WHERE site = ? AND month = ? AND seq > ? LIMIT 1000",
                (site, head.month, head.seq)))
            if not later:
                break
            head.seq, head.hash = later[-1].seq, later[-1].hash
        return head

    def seen(self, event_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """Those of the records already chained: one request per slice of ids (partition-key IN), not
        one per record, since every record of ingest is asked about."""
        ids = list(dict.fromkeys(event_ids))
        slices = [(ids[start:start + SEEN_SLICE],) for start in range(0, len(ids), SEEN_SLICE)]
        rows = self.db.paged("SELECT event_id FROM audit_ids WHERE event_id IN ?", slices, SEEN_SLICE)
        return {row.event_id for row in rows}

    def append(self, site: str, head: Head, records: list[dict[str, Any]]) -> Head:
        """Chain ``records`` after ``head``; the new head. Raises :class:`Conflict` if another builder got
        there first (nothing of this call is then written)."""
        if not records:
            return head
        entries: list[tuple[str, Entry]] = []
        seq, prev = head.seq, head.hash
        for record in records:
            text = canonical(record)
            seq += 1
            digest = link(prev, text)
            at = dt.datetime.fromisoformat(record["occurred_at"].replace("Z", "+00:00"))
            entries.append((month_of(record["occurred_at"]), Entry(site, seq, at, uuid.UUID(record["event_id"]),
                                                                   text, prev, digest)))
            prev = digest
        # One conditional batch per month partition (a batch may straddle the turn of a month).
        for month in dict.fromkeys(m for m, _ in entries):
            batch = BatchStatement(batch_type=BatchType.LOGGED, serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL)
            stmt = self.db.prepare(
                "INSERT INTO audit_log (site, month, seq, occurred_at, event_id, record, prev_hash, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
            )
            for m, e in entries:
                if m == month:
                    batch.add(stmt, (site, month, e.seq, e.occurred_at, e.event_id, e.record, e.prev_hash, e.hash))
            row = self.db.session.execute(batch).one()
            if row is not None and not row[0]:
                raise Conflict(f"audit chain of site {site} moved past {head.seq}")
            first = next(e.seq for m, e in entries if m == month)
            # The lowest sequence number of the month wins (a lower write timestamp loses, so it is inverted).
            self.db.execute("INSERT INTO audit_months (site, month, first_seq) VALUES (?, ?, ?) USING TIMESTAMP ?",
                            (site, month, first, 2**62 - first))
        last_month, last = entries[-1]
        self.db.execute("INSERT INTO audit_heads (site, seq, hash, month) VALUES (?, ?, ?, ?)",
                        (site, last.seq, last.hash, last_month))
        self._index(entries)
        return Head(last.seq, last.hash, last_month, head.since_checkpoint + len(entries))

    def _index(self, entries: list[tuple[str, Entry]]) -> None:
        """The look-up rows of a batch of records, one request per partition: the records of a batch
        mostly share their users (AE titles) and studies, so those partitions get one mutation each."""
        writes = PartitionWrites()
        for month, e in entries:
            record = json.loads(e.record)
            writes.add(e.event_id, self.db.write("INSERT INTO audit_ids (event_id, site, seq) VALUES (?, ?, ?)",
                                                 (e.event_id, e.site, e.seq)))
            keys = {("patient", o["id"]) for o in record["objects"] if o["type"] == "patient"}
            keys |= {("study", o["id"]) for o in record["objects"] if o["type"] == "study"}
            keys |= {("user", p["user_id"]) for p in record["participants"]}
            keys |= {("user", p["ae_title"]) for p in record["participants"] if p.get("ae_title")}
            for kind, value in keys:
                table, column = {"patient": ("audit_by_patient", "patient_id"), "study": ("audit_by_study", "study_uid"),
                                 "user": ("audit_by_user", "user_id")}[kind]
                writes.add(value, self.db.write(
                    f"INSERT INTO {table} ({column}, occurred_at, site, seq, month) VALUES (?, ?, ?, ?, ?)",
                    (value, e.occurred_at, e.site, e.seq, month)))
        execute_concurrent(self.db.session, writes.statements(), concurrency=64, raise_on_first_error=True)

    def checkpoint(self, site: str, head: Head, key: Ed25519PrivateKey) -> Head:
        """Sign the chain's hash at ``head``."""
        signature = key.sign(_signed_text(site, head.seq, head.hash))
        self.db.execute(
            "INSERT INTO audit_checkpoints (site, seq, hash, signature, key_id, signed_at) VALUES (?, ?, ?, ?, ?, ?)",
            (site, head.seq, head.hash, signature, key_id(key.public_key()), dt.datetime.now(dt.timezone.utc)),
        )
        return Head(head.seq, head.hash, head.month, 0)

    # -- reading ---------------------------------------------------------------------------------------

    def sites(self) -> list[str]:
        return sorted(row.site for row in self.db.execute("SELECT site FROM audit_heads"))

    def months(self, site: str) -> list[str]:
        return sorted(row.month for row in self.db.execute("SELECT month FROM audit_months WHERE site = ?", (site,)))

    def entries(self, site: str) -> Iterator[Entry]:
        """The site's chain from its first record, in order."""
        for month in self.months(site):
            for row in self.db.paged(
                "SELECT seq, occurred_at, event_id, record, prev_hash, hash FROM audit_log WHERE site = ? AND month = ?",
                [(site, month)], 1000,
            ):
                yield Entry(site, row.seq, row.occurred_at, row.event_id, row.record, row.prev_hash, row.hash)

    def recent(self, site: str, limit: int) -> list[Entry]:
        """The site's last ``limit`` records in its chain, newest first (from its latest month)."""
        months = self.months(site)
        if not months:
            return []
        rows = self.db.execute(
            "SELECT seq, occurred_at, event_id, record, prev_hash, hash FROM audit_log"
            " WHERE site = ? AND month = ? ORDER BY seq DESC LIMIT ?", (site, months[-1], limit))
        return [Entry(site, r.seq, r.occurred_at, r.event_id, r.record, r.prev_hash, r.hash) for r in rows]

    def entry(self, site: str, month: str, seq: int) -> Entry | None:
        row = self.db.execute(
            "SELECT seq, occurred_at, event_id, record, prev_hash, hash FROM audit_log"
            " WHERE site = ? AND month = ? AND seq = ?", (site, month, seq)).one()
        return Entry(site, row.seq, row.occurred_at, row.event_id, row.record, row.prev_hash, row.hash) if row else None

    def checkpoints(self, site: str) -> list[Any]:
        return list(self.db.execute("SELECT seq, hash, signature, key_id FROM audit_checkpoints WHERE site = ?", (site,)))

    def query(self, kind: str, value: str, since: dt.datetime | None, until: dt.datetime | None) -> Iterator[Entry]:
        """Records naming a patient (``kind`` "patient"), a study or a user/AE, between two times."""
        table, column = {"patient": ("audit_by_patient", "patient_id"), "study": ("audit_by_study", "study_uid"),
                         "user": ("audit_by_user", "user_id")}[kind]
        since = since or dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        until = until or dt.datetime(9999, 1, 1, tzinfo=dt.timezone.utc)
        for row in self.db.paged(
            f"SELECT site, seq, month FROM {table} WHERE {column} = ? AND occurred_at >= ? AND occurred_at <= ?",
            [(value, since, until)], 500,
        ):
            found = self.entry(row.site, row.month, row.seq)
            if found is not None:
                yield found


# -- verifying ------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    site: str
    records: int = 0
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"site": self.site, "records": self.records, "checkpoints": self.checkpoints, "ok": self.ok,
                "problems": self.problems}


def verify(log_store: AuditLog, site: str, public: Ed25519PublicKey) -> Verdict:
    """Walk a site's chain: every link, every sequence number, every checkpoint and its signature."""
    verdict = Verdict(site)
    hashes: dict[int, str] = {}
    expected_seq, prev = 1, GENESIS
    for entry in log_store.entries(site):
        verdict.records += 1
        if entry.seq != expected_seq:
            verdict.problems.append(f"records {expected_seq}..{entry.seq - 1} are missing (removed)"
                                    if entry.seq > expected_seq else f"record {entry.seq} is out of order")
        if entry.prev_hash != prev:
            verdict.problems.append(f"record {entry.seq} does not link to the record before it (moved or replaced)")
        if link(entry.prev_hash, entry.record) != entry.hash:
            verdict.problems.append(f"record {entry.seq} ({entry.event_id}) was changed after it was chained")
        hashes[entry.seq] = entry.hash
        expected_seq, prev = entry.seq + 1, entry.hash
        if len(verdict.problems) >= 20:
            verdict.problems.append("(more problems not listed)")
            return verdict
    for checkpoint in log_store.checkpoints(site):
        verdict.checkpoints += 1
        try:
            public.verify(checkpoint.signature, _signed_text(site, checkpoint.seq, checkpoint.hash))
        except InvalidSignature:
            verdict.problems.append(f"checkpoint at record {checkpoint.seq} is not signed by the grid's audit key")
            continue
        if checkpoint.seq not in hashes:
            verdict.problems.append(f"checkpoint at record {checkpoint.seq} names a record the chain no longer has "
                                    "(removed from the end)")
        elif hashes[checkpoint.seq] != checkpoint.hash:
            verdict.problems.append(f"the chain up to record {checkpoint.seq} differs from what was signed "
                                    "(rewritten)")
    return verdict

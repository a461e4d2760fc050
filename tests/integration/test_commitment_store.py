"""The Storage Commitment transaction store on the real Cassandra cluster: conditional updates decide who
owns a transaction and who reports it, however many receivers ask at once."""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Iterator

import pytest
from pydicom.uid import generate_uid

from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.commitments import (
    PENDING,
    REPORTED,
    REPORTING,
    CommitmentResult,
    Reference,
    TransactionStore,
    utcnow,
)

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def db(grid) -> Iterator[Cassandra]:
    db = Cassandra(grid.config, local_dc="dc1")
    yield db
    db.close()


def stores(db: Cassandra, *owners: str, lease_s: float = 30.0) -> list[TransactionStore]:
    # A grid name of its own: the running test grid's receivers must not take these transactions over.
    return [TransactionStore(db, f"store-test-{os.getpid()}", "A", owner, lease_s) for owner in owners]


def test_a_transaction_is_kept_once_and_a_repeat_finds_the_first(db: Cassandra) -> None:
    (store,) = stores(db, "r1")
    items = (Reference(CT, generate_uid()), Reference(CT, generate_uid()))
    tx = store.new_transaction(generate_uid(), "PACS", "10.0.0.5:4000", items, utcnow(), 60)
    assert store.open(tx) is None
    again = store.new_transaction(tx.uid, "OTHER", "10.0.0.6:4000", items[:1], utcnow(), 60)
    kept = store.open(again)
    assert kept == tx  # nothing written over it, timestamps exactly as kept
    assert not kept.same_request(again) and kept.same_request(tx)
    assert tx.uid in {e.transaction_uid for e in store.open_entries()}


def test_of_receivers_racing_for_an_expired_lease_exactly_one_wins(db: Cassandra) -> None:
    # The dead owner's lease ran out long ago; a winner's lease outlasts the whole race, however slowly
    # a loaded machine runs the rivals' lightweight transactions.
    (dead,) = stores(db, "dead", lease_s=1.0)
    rivals = stores(db, *(f"r{n}" for n in range(6)), lease_s=60.0)
    past = utcnow() - dt.timedelta(seconds=10)
    tx = dead.new_transaction(generate_uid(), "PACS", "", (Reference(CT, generate_uid()),), past, 60)
    assert dead.open(tx) is None
    seen = dead.load(tx.uid)
    assert seen is not None and seen.lease_until < utcnow()

    wins: list[str] = []
    start = threading.Barrier(len(rivals))

    def race(store: TransactionStore) -> None:
        start.wait()
        if store.claim(seen, utcnow()) is not None:
            wins.append(store.owner)

    threads = [threading.Thread(target=race, args=(s,)) for s in rivals]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert db_owner(dead, tx.uid) == wins[0]
    assert dead.renew(tx.uid, utcnow()) is None  # the dead owner cannot come back to it


def db_owner(store: TransactionStore, uid: str) -> str | None:
    tx = store.load(uid)
    return tx.owner if tx else None


def test_only_the_owner_reports_and_only_once(db: Cassandra) -> None:
    owner, other = stores(db, "r1", "r2")
    ref = Reference(CT, generate_uid())
    tx = owner.new_transaction(generate_uid(), "PACS", "", (ref,), utcnow(), 60)
    owner.open(tx)
    result = CommitmentResult((ref,))
    assert other.claim(tx, utcnow()) is None  # the lease runs
    assert not other.begin_report(tx.uid, result)
    assert owner.begin_report(tx.uid, result)
    assert not owner.begin_report(tx.uid, result)  # no longer pending
    assert owner.load(tx.uid).state == REPORTING and owner.load(tx.uid).result == result
    assert not other.finish(tx.uid, REPORTED, 1, utcnow())
    assert owner.finish(tx.uid, REPORTED, 1, utcnow())
    assert owner.load(tx.uid).state == REPORTED
    assert tx.uid not in {e.transaction_uid for e in owner.open_entries()}


def test_a_released_lease_can_be_claimed_at_once(db: Cassandra) -> None:
    owner, successor = stores(db, "r1", "r2")
    tx = owner.new_transaction(generate_uid(), "PACS", "", (Reference(CT, generate_uid()),), utcnow(), 60)
    owner.open(tx)
    assert successor.claim(owner.load(tx.uid), utcnow()) is None
    assert owner.release(tx.uid, utcnow())
    claimed = successor.claim(owner.load(tx.uid), utcnow() + dt.timedelta(milliseconds=5))
    assert claimed is not None and claimed.owner == "r2" and claimed.state == PENDING

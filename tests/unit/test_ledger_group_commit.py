"""The replica ledger's group commit (core.ledger.ReplicaLedger.record), against a stand-in Cassandra
whose requests block until the test lets them return: rows recorded while a request is in flight share
the next one, and a failed request fails every caller whose row it carried."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from cassandra.query import BatchStatement

from dicomgrid.core.blobstore import BlobRef
from dicomgrid.core.ledger import ReplicaLedger


class _Session:
    def __init__(self) -> None:
        self.requests: list[list[Any]] = []  # each request as the rows it carried
        self.gate = threading.Event()
        self.gate.set()
        self.in_flight = threading.Event()
        self.fail: Exception | None = None

    def execute(self, stmt: Any, params: Any) -> None:
        batched = isinstance(stmt, BatchStatement)
        self.requests.append(list(stmt._statements_and_parameters) if batched else [(stmt, params)])
        self.in_flight.set()
        assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail


class _Db:
    def __init__(self) -> None:
        self.session = _Session()

    def write(self, cql: str, params: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        return cql.replace("?", "%s"), params  # a simple statement, which a batch takes too

    def replicas(self, write: Any) -> frozenset[str]:
        return frozenset({"node-dc1", "node-dc2"})  # one node a datacenter: every partition on both


def _blob(i: int) -> BlobRef:
    return BlobRef("B", f"{i:064x}", 100 + i)


def _record_in_thread(ledger: ReplicaLedger, blob: BlobRef, errors: dict[int, BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            ledger.record(blob)
        except Exception as exc:
            errors[blob.size] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_queued(ledger: ReplicaLedger, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(ledger._queue) < n:
        assert time.monotonic() < deadline, "callers never queued"
        time.sleep(0.005)


def test_a_lone_row_goes_at_once_in_a_request_of_its_own() -> None:
    db = _Db()
    ReplicaLedger(db).record(_blob(1))  # type: ignore[arg-type]
    assert len(db.session.requests) == 1
    (stmt, params), = db.session.requests[0]
    assert stmt.startswith("INSERT INTO replicas") and params[:3] == (f"{1:064x}", "B", 101)


def _queued_behind_a_request(db: _Db, ledger: ReplicaLedger, waiting: int,
                             errors: dict[int, BaseException]) -> list[threading.Thread]:
    """One caller whose request is held in flight, and ``waiting`` more queued behind it."""
    db.session.gate.clear()
    first = _record_in_thread(ledger, _blob(0), errors)
    assert db.session.in_flight.wait(10)
    others = [_record_in_thread(ledger, _blob(i), errors) for i in range(1, waiting + 1)]
    _wait_queued(ledger, waiting)
    return [first, *others]


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()


def test_rows_recorded_while_a_request_is_in_flight_share_the_next_request() -> None:
    db = _Db()
    ledger = ReplicaLedger(db)  # type: ignore[arg-type]
    errors: dict[int, BaseException] = {}
    threads = _queued_behind_a_request(db, ledger, 4, errors)
    db.session.gate.set()
    _join(threads)
    assert not errors
    assert [len(r) for r in db.session.requests] == [1, 4], "the four queued rows went in one request"


def test_a_failed_request_fails_every_caller_whose_row_it_carried_and_the_next_ones_go_on() -> None:
    db = _Db()
    ledger = ReplicaLedger(db)  # type: ignore[arg-type]
    errors: dict[int, BaseException] = {}
    threads = _queued_behind_a_request(db, ledger, 3, errors)
    db.session.fail = RuntimeError("coordinator timed out")
    db.session.gate.set()
    _join(threads)
    assert sorted(errors) == [100, 101, 102, 103]
    assert all(str(e) == "coordinator timed out" for e in errors.values())

    db.session.fail = None
    ledger.record(_blob(9))
    assert len(db.session.requests) == 3 and not ledger._sending


@pytest.mark.parametrize("callers", [8, 32])
def test_many_concurrent_callers_all_return_and_every_row_is_sent_once(callers: int) -> None:
    db = _Db()
    ledger = ReplicaLedger(db)  # type: ignore[arg-type]
    errors: dict[int, BaseException] = {}
    _join([_record_in_thread(ledger, _blob(i), errors) for i in range(callers)])
    assert not errors
    assert sum(len(r) for r in db.session.requests) == callers
    assert not ledger._sending and not ledger._queue

"""What the indexer asks of Cassandra per instance: requests, mutations, rows, SAI updates and reads.

Cassandra's CPU per ingested instance follows these counts (each mutation is a commit log entry and a
memtable update on every replica, each indexed column written an SAI memtable update), so they are kept
under a budget here instead of being found again in the benchmark.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from cassandra.query import BatchStatement, BoundStatement, PreparedStatement
from pydicom.uid import generate_uid

from dicomgrid.core.cassandra import MAX_PARTITIONS_PER_REQUEST, Cassandra, apply_schema
from dicomgrid.core.index_writer import IndexWriter
from dicomgrid.processors.indexer import Indexer
from tests.integration.test_indexer import event

pytestmark = [pytest.mark.cluster]

_TABLE = re.compile(r"^\s*(?:INSERT INTO|UPDATE)\s+(?:\w+\.)?(\w+)", re.IGNORECASE)
_INSERT_COLUMNS = re.compile(r"\(([^)]*)\)\s*VALUES", re.IGNORECASE)
_SET_COLUMNS = re.compile(r"\bSET\s+(.*?)\s+WHERE\b", re.IGNORECASE | re.DOTALL)


def _columns(cql: str) -> set[str]:
    if m := _INSERT_COLUMNS.search(cql):
        return {c.strip() for c in m.group(1).split(",")}
    if m := _SET_COLUMNS.search(cql):
        return {part.split("=")[0].strip() for part in m.group(1).split(",")}
    return set()


@dataclass
class Tally:
    """What one session was asked to do."""

    indexed: dict[str, set[str]]  # table -> columns with an SAI index
    prepared: dict[str, PreparedStatement]  # the Cassandra wrapper's statements, by CQL
    requests: Counter = field(default_factory=Counter)
    rows: Counter = field(default_factory=Counter)  # table -> row writes
    mutations: int = 0  # distinct partition keys per write request (Cassandra applies one mutation each)
    multi_partition_batches: int = 0
    sai_updates: int = 0
    reads: int = 0  # partitions read (an IN of n keys counts n)

    def _write(self, stmt: PreparedStatement, values: list[Any]) -> bytes:
        cql = stmt.query_string
        table = _TABLE.match(cql).group(1)
        self.rows[table] += 1
        self.sai_updates += len(_columns(cql) & self.indexed.get(table, set()))
        return b"|".join(values[i] or b"" for i in stmt.routing_key_indexes or ())

    def record(self, statement: Any, parameters: Any) -> None:
        if isinstance(statement, BatchStatement):
            self.requests["batch"] += 1
            by_id = {stmt.query_id: stmt for stmt in self.prepared.values()}
            keys = {self._write(by_id[qid], list(values))
                    for _, qid, values in statement._statements_and_parameters}
            self.mutations += len(keys)
            self.multi_partition_batches += len(keys) > 1
            return
        stmt = statement.prepared_statement if isinstance(statement, BoundStatement) else statement
        if not isinstance(stmt, PreparedStatement):
            self.requests["other"] += 1
            return
        cql = stmt.query_string.lstrip().upper()
        if cql.startswith("SELECT"):
            self.requests["read"] += 1
            in_list = next((p for p in (parameters or ()) if isinstance(p, list)), None)
            self.reads += len(in_list) if in_list is not None else 1
            return
        self.requests["write"] += 1
        bound = stmt.bind(parameters) if not isinstance(statement, BoundStatement) else statement
        self._write(stmt, list(bound.values))
        self.mutations += 1


class CountingSession:
    """The driver session, recording every request the indexer makes."""

    def __init__(self, session: Any, tally: Tally) -> None:
        self._session, self._tally = session, tally

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def execute(self, statement: Any, parameters: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._tally.record(statement, parameters)
        return self._session.execute(statement, parameters, *args, **kwargs)

    def execute_async(self, statement: Any, parameters: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._tally.record(statement, parameters)
        return self._session.execute_async(statement, parameters, *args, **kwargs)


@pytest.fixture(scope="module")
def db(cluster):
    config = cluster.model_copy(update={"cassandra": cluster.cassandra.model_copy(update={"keyspace": "dicomgrid_test"})})
    apply_schema(config)
    db = Cassandra(config, local_dc="dc1")
    yield db
    db.close()


def _indexed_columns(db: Cassandra) -> dict[str, set[str]]:
    indexed: dict[str, set[str]] = {}
    for row in db.session.execute("SELECT table_name, options FROM system_schema.indexes WHERE keyspace_name = %s",
                                  (db.config.cassandra.keyspace,)):
        target = re.sub(r"^\w+\((\w+)\)$", r"\1", row.options["target"])
        indexed.setdefault(row.table_name, set()).add(target)
    return indexed


def measure(db: Cassandra, batches: list[list[dict]]) -> tuple[Tally, int]:
    indexer = Indexer(IndexWriter(db))
    db.session  # connect before the session is wrapped
    tally = Tally(_indexed_columns(db), db._prepared)
    real = db._session
    db._session = CountingSession(real, tally)
    try:
        for batch in batches:
            indexer.apply(batch)
    finally:
        db._session = real
    return tally, sum(len(b) for b in batches)


def test_per_instance_cost_of_a_study_in_two_batches(db):
    """Two batches of 40 new instances of one study (two series), as the indexer takes them in ingest."""
    now = dt.datetime.now(dt.timezone.utc)
    study, series = generate_uid(), [generate_uid(), generate_uid()]
    batches = [
        [event(study, series[i % 2], generate_uid(), when=now + dt.timedelta(milliseconds=b * 40 + i)) for i in range(40)]
        for b in range(2)
    ]
    tally, n = measure(db, batches)
    print(
        f"\nper instance: requests {sum(tally.requests.values()) / n:.3f} ({dict(tally.requests)}),"
        f" mutations {tally.mutations / n:.3f}, rows {sum(tally.rows.values()) / n:.3f} ({dict(tally.rows)}),"
        f" multi-partition batches {tally.multi_partition_batches / n:.3f}, SAI updates {tally.sai_updates / n:.3f},"
        f" partitions read {tally.reads / n:.3f}"
    )
    # An instance's UID rows and its digest's replica row are two partitions, which one replica set
    # holds on the local single-node datacenter: several instances share a request, up to the
    # partitions a request may carry. Then one request per study and patient per batch.
    per_request = MAX_PARTITIONS_PER_REQUEST // 2
    assert sum(tally.requests.values()) <= -(-40 // per_request) * 2 + 2 * 2 + 3
    # Two mutations per instance (its UID's partition, its digest's), one per study and patient per batch.
    assert tally.mutations <= 2 * n + 2 * 2
    # Storage-attached indexes are updated by the batch's study, series and patient rows, never per instance.
    assert tally.sai_updates <= 2 * (4 + 1 + 2 * 2 + 1)
    # The version look-up (partition-key IN) reads each UID once; the rest is the new study's probe.
    assert tally.reads <= n + 1

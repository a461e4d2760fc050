"""A stand-in for the indexer's Cassandra session: it models the index tables just enough to answer the
indexer's reads, and counts requests, partition updates ("mutations": one per table partition written
by a request), rows written and rows read."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import re
import uuid

import pytest

import dicomgrid.core.index_writer as iw


class Stmt:
    def __init__(self, cql): self.cql = cql
    def bind(self, params): return (self, params)

class Rows(list):
    def one(self): return self[0] if self else None

class Future:
    def __init__(self, rows): self.rows = rows
    def result(self): return self.rows

Row = collections.namedtuple

class Fake:
    def __init__(self):
        self.c = collections.Counter()
        self.instances = collections.defaultdict(dict)  # study -> sop -> series
        self.versions = {}
        self.studies = {}
        self.studies_counts = {}  # study -> (number_of_series, number_of_instances)
        self.series_counts = collections.defaultdict(dict)  # study -> series -> number_of_instances
        self.fail_on = None  # a parameter value whose write fails (after the writes before it)
        self.session = self
    def prepare(self, cql): return Stmt(cql)
    def write(self, cql, params): return Stmt(cql), params
    def _partitions(self, stmt, params):
        cql = stmt.cql
        table = re.search(r"(?:INTO|UPDATE)\s+(\w+)", cql).group(1)
        if cql.startswith("INSERT"):
            return {(table, params[0])}
        where = cql.split("WHERE", 1)[1]
        return {(table, params[len(params) - where.count("?")])}
    def _apply(self, stmt, params):
        cql = stmt.cql
        if self.fail_on is not None and self.fail_on in params:
            raise RuntimeError("write failed")
        if cql.startswith("UPDATE series SET number_of_instances"):
            self.series_counts[params[2]][params[3]] = params[0]
        if cql.startswith("UPDATE studies SET") and "number_of_instances" in cql:
            self.studies_counts[params[-1]] = (params[-4], params[-3])
        if cql.startswith("INSERT INTO instances "):
            self.instances[params[0]][params[2]] = (params[1], params[3])
        if cql.startswith("INSERT INTO instance_versions"):
            self.versions.setdefault(params[0], {})[params[1]] = params
        if cql.startswith("UPDATE instance_versions SET version"):
            row = list(self.versions[params[1]][params[2]])
            row[2] = params[0]
            self.versions[params[1]][params[2]] = tuple(row)
        if cql.startswith("UPDATE studies SET modalities_in_study"):
            self.studies[params[-1]] = (params[0], params[1])
    def run_write(self, stmt, params):
        self.c["requests"] += 1
        if isinstance(stmt, list):  # an unlogged batch
            parts = set()
            for s, p in stmt:
                parts |= self._partitions(s, p); self._apply(s, p); self.c["rows_written"] += 1
            self.c["mutations"] += len(parts)
        else:
            self.c["mutations"] += len(self._partitions(stmt, params)); self._apply(stmt, params); self.c["rows_written"] += 1
    def read(self, cql, params):
        self.c["requests"] += 1; self.c["reads"] += 1
        if "count(*)" in cql:
            per = collections.Counter(series for series, _ in self.instances[params[0]].values())
            self.c["rows_read"] += sum(per.values())
            return Rows(Row("R", "series_uid n")(s, n) for s, n in per.items())
        if cql.startswith("SELECT sop_class_uid FROM instances"):
            rows = self.instances[params[0]].values(); self.c["rows_read"] += len(rows)
            return Rows(Row("R", "sop_class_uid")(c) for _, c in rows)
        if "FROM series" in cql:
            series = {s for s, _ in self.instances[params[0]].values()}
            self.c["rows_read"] += len(series)
            return Rows(Row("R", "series_uid modality")(s, "CT") for s in series)
        if "FROM studies" in cql:
            got = self.studies.get(params[0]); self.c["rows_read"] += bool(got)
            return Rows([Row("R", "modalities_in_study sop_classes_in_study")(*got)] if got else [])
        if "FROM instance_versions" in cql:
            out = []
            for uid in params[0]:
                for sha, p in self.versions.get(uid, {}).items():
                    out.append(Row("R", "sop_instance_uid sha256 version study_uid series_uid received_at")(uid, sha, p[2], p[3], p[4], p[7]))
            self.c["rows_read"] += len(out)
            return Rows(out)
        if "FROM instances WHERE study_uid = ? LIMIT 1" in cql:
            got = bool(self.instances[params[0]]); self.c["rows_read"] += got
            return Rows([1] if got else [])
        if "WRITETIME(version)" in cql:
            return Rows([Row("R", "at")(None)])
        raise AssertionError(cql)
    def execute(self, cql, params=(), **kw):
        cql = cql.cql if isinstance(cql, Stmt) else cql
        if cql.lstrip().startswith(("INSERT", "UPDATE")):
            self.run_write(Stmt(cql), tuple(params)); return Rows([])
        return self.read(cql, tuple(params))
    def execute_async(self, stmt, params=(), **kw):
        return Future(self.execute(stmt, params))

def fake_execute_concurrent(session, writes, **kw):
    for stmt, params in writes:
        session.run_write(stmt, params)


@pytest.fixture
def fake_db(monkeypatch) -> Fake:
    """A fake session; batches are recorded as lists of their statements."""
    monkeypatch.setattr(iw, "execute_concurrent", fake_execute_concurrent)
    monkeypatch.setattr(iw, "_unlogged", lambda writes: list(writes))
    return Fake()


def stored_event(study: str, series: str, sop: str, at: dt.datetime, payload: bytes = b"") -> dict:
    digest = hashlib.sha256(sop.encode() + payload).hexdigest()
    return {"event_id": str(uuid.uuid4()), "event_type": "dicom.instance.stored", "schema_version": 2,
            "occurred_at": at.isoformat().replace("+00:00", "Z"), "site": "A",
            "source": {"protocol": "DIMSE", "calling_ae": None, "called_ae": None, "peer_address": None},
            "patient": {"id": "P1", "issuer": None, "name": "N", "birth_date": None, "sex": "O"},
            "study": {"uid": study, "date": "20240101"}, "series": {"uid": series, "modality": "CT"},
            "instance": {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "sop_instance_uid": sop,
                         "transfer_syntax_uid": "1.2.840.10008.1.2.1"},
            "payload": {"uri": f"blob://A/sha256/{digest}", "site": "A", "sha256": digest, "size": 40000}}

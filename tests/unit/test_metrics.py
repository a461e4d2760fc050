"""The metrics plumbing: what each HTTP request is counted as, handler timing, multiprocess sums, and
what the status page shows of an audit record."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from dicomgrid.consumers.grid_status import audit_summary
from dicomgrid.core import metrics
from dicomgrid.http import operation_of


@pytest.mark.parametrize(("method", "path", "operation"), [
    ("POST", "/dicomweb/studies", "STOW-RS"),
    ("POST", "/dicomweb/studies/1.2.3", "STOW-RS"),
    ("GET", "/dicomweb/studies", "QIDO-RS"),
    ("GET", "/dicomweb/studies/1.2.3/series", "QIDO-RS"),
    ("GET", "/dicomweb/studies/1.2.3/series/4.5/instances", "QIDO-RS"),
    ("GET", "/dicomweb/studies/1.2.3", "WADO-RS"),
    ("GET", "/dicomweb/studies/1.2.3/series/4.5/instances/6.7/frames/1", "WADO-RS"),
    ("GET", "/dicomweb/studies/1.2.3/metadata", "WADO-RS"),
    ("GET", "/trials/t1/dicomweb/studies", "trial QIDO-RS"),
    ("GET", "/internal/payloads/abc", "payload-transfer"),
    ("GET", "/health", None),
    ("GET", "/metrics", None),
    ("GET", "/status.json", None),
])
def test_each_request_is_counted_as_its_operation(method, path, operation):
    assert operation_of(method, path) == operation


def count(operation: str) -> float:
    return REGISTRY.get_sample_value("dicomgrid_request_seconds_count", {"site": "unit", "operation": operation}) or 0


def test_a_generator_handler_is_timed_until_its_last_response():
    def find(event):
        yield 0xFF00, "one"
        yield 0xFF00, "two"
        yield 0x0000, None

    timed = metrics.timed_handler("unit", "C-FIND-gen", find)
    responses = timed(None)
    assert count("C-FIND-gen") == 0
    assert [status for status, _ in responses] == [0xFF00, 0xFF00, 0x0000]
    assert count("C-FIND-gen") == 1
    assert metrics.timed_handler("unit", "C-STORE-fn", lambda event: 0x0000)(None) == 0x0000
    assert count("C-STORE-fn") == 1


def _child(directory: str) -> None:
    metrics.enable_multiprocess(Path(directory))
    metrics.INSTANCES_RECEIVED.labels("A", "DIMSE", "0x0000").inc(3)
    metrics.INDEX_LAG.labels("A").set(1.5)


def test_the_processes_of_a_site_add_up_in_one_exposition(tmp_path, monkeypatch):
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as a service process is
    for _ in range(2):
        child = ctx.Process(target=_child, args=(str(tmp_path),))
        child.start()
        child.join(30)
        assert child.exitcode == 0
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert found[("dicomgrid_instances_received_total", (("site", "A"), ("status", "0x0000"), ("via", "DIMSE")))] == 6
    assert found[("dicomgrid_index_lag_seconds", (("site", "A"),))] == 1.5
    metrics.reset_multiprocess(tmp_path)
    assert not list(tmp_path.iterdir())
    assert os.environ[metrics.MULTIPROC_ENV] == str(tmp_path)


RECORD = {
    "occurred_at": "2026-12-01T10:00:00Z", "site": "A", "event": "Query", "action": "E", "outcome": 0,
    "description": "C-FIND", "participants": [
        {"user_id": "FINDSCU", "ae_title": "FINDSCU", "requestor": True},
        {"user_id": "A", "ae_title": "GRID_A", "requestor": False}],
    "objects": [{"type": "patient", "id": "PAT-123", "detail": {"name": "Doe^Jane"}},
                {"type": "query", "id": "1.2.840.10008.5.1.4.1.2.2.1", "detail": {"PatientName": "Doe*"}},
                {"type": "study", "id": "1.2.3"}],
}


def test_the_status_page_shows_audit_records_without_identities():
    shown = audit_summary(RECORD, with_identities=False)
    assert shown["by"] == ["FINDSCU"] and shown["objects"] == {"patient": 1, "query": 1, "study": 1}
    assert "PAT-123" not in str(shown) and "Doe" not in str(shown)
    full = audit_summary(RECORD, with_identities=True)
    assert {"type": "patient", "id": "PAT-123", "name": "Doe^Jane"} in full["identities"]

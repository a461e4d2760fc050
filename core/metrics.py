"""The grid's Prometheus metrics: one place that names them all, and the ``/metrics`` exposition.

A site runs several processes (receivers, http, processors, replicator, sink) and only the http service
has an HTTP port, so a site's processes share prometheus-client's multiprocess mode: each writes its
samples to files in the site's metrics directory (:func:`enable_multiprocess`, called by every
``dicomgrid serve`` command before anything imports prometheus-client), and the http service's
``/metrics`` adds up the site's files. A process that never enabled it (a test, a CLI job) keeps its
samples in memory, in the default registry.

Labels never carry patient data: sites, operations, statuses and outcomes only.
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: DIMSE and DICOMweb requests span 1 ms (a C-ECHO) to minutes (a study's C-GET).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

INSTANCES_RECEIVED = Counter(
    "dicomgrid_instances_received", "Instances offered to a site (C-STORE, STOW-RS), by DICOM status.",
    ["site", "via", "status"],
)
BYTES_RECEIVED = Counter(
    "dicomgrid_received_bytes", "Bytes of the instances a site stored.", ["site", "via"],
)
REQUEST_SECONDS = Histogram(
    "dicomgrid_request_seconds", "Time to answer a request (C-STORE, C-FIND, C-GET, C-MOVE, QIDO-RS, "
    "WADO-RS, STOW-RS, ...), by operation.", ["site", "operation"], buckets=LATENCY_BUCKETS,
)
INDEX_LAG = Gauge(
    "dicomgrid_index_lag_seconds", "From an instance's receipt to its indexing, for the last batch indexed.",
    ["site"], multiprocess_mode="mostrecent",
)
INDEXED = Counter("dicomgrid_instances_indexed", "Instances the site's indexer wrote to its datacenter.", ["site"])
REPLICATION_LAG = Histogram(
    "dicomgrid_replication_lag_seconds", "From an instance's receipt at its first site to a verified copy here.",
    ["site"], buckets=LAG_BUCKETS,
)
REPLICATION_COPIES = Counter(
    "dicomgrid_replication_requests", "Replication requests the site's worker settled, by outcome.",
    ["site", "outcome"],
)
REPLICATION_BACKLOG = Gauge(
    "dicomgrid_replication_backlog", "Replication requests to this site its worker has not committed yet.",
    ["site"], multiprocess_mode="mostrecent",
)
AUDIT_SPOOL_DEPTH = Gauge(
    "dicomgrid_audit_spool_records", "Audit records kept on the site's disk until Kafka confirms them.",
    ["site", "process"], multiprocess_mode="mostrecent",
)


def metrics_dir(root: Path, grid: str, site: str) -> Path:
    return root / "run" / "metrics" / grid / site


def enable_multiprocess(directory: Path) -> None:
    """Make this process write its samples to ``directory`` (shared by one site's processes).

    prometheus-client picks its storage class when it is imported; every metric here has labels, and
    a labelled metric makes its storage at its first ``labels()``, so switching the class now covers
    every sample this process records.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def reset_multiprocess(directory: Path) -> None:
    """Forget the samples of a site's earlier runs (when none of its services runs: a service that
    restarts keeps counting on from what its predecessors counted)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def exposition() -> tuple[bytes, str]:
    """The body and content type of ``/metrics``: the whole site's samples in multiprocess mode."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


@contextmanager
def timed(site: str, operation: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        REQUEST_SECONDS.labels(site, operation).observe(time.perf_counter() - started)



def timed_handler(site: str, operation: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler`` (a pynetdicom event handler) observed in :data:`REQUEST_SECONDS`; a generator
    handler (C-FIND, C-GET, C-MOVE) is timed until its last response."""
    if inspect.isgeneratorfunction(handler):
        def generator(event: Any) -> Iterator[Any]:
            with timed(site, operation):
                yield from handler(event)
        return generator

    def call(event: Any) -> Any:
        with timed(site, operation):
            return handler(event)
    return call

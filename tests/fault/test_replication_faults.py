"""Replication when a part of the grid fails: a worker killed mid-transfer, a source site gone dark.

The session grid's own replication worker of site B is stopped for these tests and a worker of the
test's own (same grid, same consumer group) runs in its place, so it can be throttled and killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.ledger import ReplicaLedger
from tests.dicom_samples import make_instance
from dicomgrid.processors.replicator import replication_group
from tests.fault.whole import assert_whole
from tests.grid import committed_lag, wait_for
from tests.integration.test_ingest_grid import c_store, events_for

pytestmark = [pytest.mark.cluster, pytest.mark.fault]

PAYLOAD_BYTES = 24_000_000
THROTTLE_MB_S = 4


def _cli(grid, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(grid.config_file), *args],
                          capture_output=True, text=True, timeout=300)


def _service(grid, name: str):
    return next(s for s in grid.supervisor.services() if s.name == name)


class Worker:
    """A replication worker of site B run by the test: ``dicomgrid serve replicator`` with a config of its own."""

    def __init__(self, config_file: Path, log: Path) -> None:
        self.config_file, self.log = config_file, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicomgrid", "--config", str(self.config_file), "serve", "replicator",
                 "--site", "B"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def own_b_worker(grid, tmp_path: Path) -> Iterator[tuple[Worker, Worker]]:
    """(a throttled worker, an unthrottled one) for site B, with the grid's own B worker stopped meanwhile."""
    grid.supervisor.stop_service(_service(grid, "B/replicator"), 30)
    base = grid.config_file.read_text()
    throttled = tmp_path / "throttled.toml"
    throttled.write_text(base + f"\n[replication]\nbandwidth_mb_s = {THROTTLE_MB_S}\n")
    workers = Worker(throttled, tmp_path / "worker.log"), Worker(grid.config_file, tmp_path / "worker.log")
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()
        grid.supervisor.up(timeout=90)


def test_a_worker_killed_mid_transfer_resumes_and_finishes_once_byte_identical(grid, own_b_worker, taps):
    throttled, plain = own_b_worker
    stored_tap, copy_tap, audit_tap = taps(), taps(schemas.TOPIC_REPLICA_STORED), taps(schemas.TOPIC_AUDIT)
    b_blobs = BlobStore(grid.config.site_storage("B"), "B")
    throttled.start()
    ds = make_instance()
    ds.Rows, ds.Columns = 2000, PAYLOAD_BYTES // 4000
    ds.PixelData = os.urandom(PAYLOAD_BYTES)
    assert c_store(grid.site("A"), [ds]) == [0]
    (event,) = events_for(stored_tap, [ds.SOPInstanceUID])
    digest, size = event["payload"]["sha256"], event["payload"]["size"]
    partial = b_blobs.root / "tmp" / f"{digest}.resume"

    # Killed a few megabytes in (the throttle makes the transfer last several seconds).
    wait_for(lambda: partial.exists() and partial.stat().st_size > 3 * THROTTLE_MB_S * 1_000_000 // 4,
             timeout=60, interval=0.1)
    throttled.kill()
    kept = partial.stat().st_size
    assert 0 < kept < size and not b_blobs.exists(digest)

    plain.start()
    (made,) = [e for e in copy_tap.collect(lambda seen: any(e["replica"]["sha256"] == digest for e in seen),
                                           timeout=90) if e["replica"]["sha256"] == digest]
    assert made["replica"]["site"] == "B" and made["replica"]["size"] == size
    a_blobs = BlobStore(grid.config.site_storage("A"), "A")
    assert b_blobs.verify(digest)
    assert b_blobs.path(digest).read_bytes() == a_blobs.path(digest).read_bytes()
    assert not partial.exists()

    # The second transfer asked site A only for what was missing (Range from the kept bytes).
    def resumed(seen):
        return [r for r in seen if r["site"] == "A" and r["outcome"] == 0 and any(
            o["type"] == "payload" and o["id"] == digest and o.get("detail", {}).get("offset", 0) > 0
            for o in r["objects"])]

    (served,) = resumed(audit_tap.collect(lambda seen: bool(resumed(seen)), timeout=30))
    detail = next(o["detail"] for o in served["objects"] if o["type"] == "payload")
    assert detail["offset"] >= kept and detail["offset"] + detail["bytes_sent"] == size

    wait_for(lambda: committed_lag(grid.config, schemas.TOPIC_REPLICATION_REQUESTED,
                                   replication_group(grid.config, "B")) == 0, timeout=60, interval=0.5)
    copy_tap.catch_up()
    assert [e["replica"]["sha256"] for e in copy_tap.seen].count(digest) == 1
    db = Cassandra(grid.config, local_dc="dc2")
    try:
        assert [r.site for r in ReplicaLedger(db).replicas(digest)].count("B") == 1
    finally:
        db.close()
    assert_whole(grid, [ds])


def test_a_source_site_gone_dark_ends_in_replication_failed_after_the_retries(grid, own_b_worker, taps):
    _, plain = own_b_worker
    failed_tap, stored_tap = taps(schemas.TOPIC_REPLICATION_FAILED), taps()
    plain.start()
    # A's receiver still takes the instance; nobody can fetch it from A.
    grid.supervisor.stop_service(_service(grid, "A/http"), 30)
    try:
        ds = make_instance()
        assert c_store(grid.site("A"), [ds]) == [0]
        (event,) = events_for(stored_tap, [ds.SOPInstanceUID])
        digest = event["payload"]["sha256"]
        (failure,) = [f for f in failed_tap.collect(
            lambda seen: any(f["source"]["sha256"] == digest for f in seen), timeout=120)
            if f["source"]["sha256"] == digest]
    finally:
        grid.supervisor.up(timeout=90)
    schemas.validate_event(schemas.TOPIC_REPLICATION_FAILED, failure)
    assert failure["target_site"] == "B" and failure["retryable"] is True
    assert failure["attempt"] == grid.config.replication.max_attempts
    assert "A:" in failure["reason"]
    assert not BlobStore(grid.config.site_storage("B"), "B").exists(digest)
    status = _cli(grid, "replication", "status", "--json")
    assert status.returncode == 0, status.stderr
    b = next(s for s in json.loads(status.stdout)["sites"] if s["site"] == "B")
    assert b["failed"] >= 1 and json.loads(status.stdout)["under_replicated"] >= 1

    # Once A serves again, anti-entropy asks B's worker for the copy it never got.
    repaired = _cli(grid, "repair", "--site", "B", "--json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert json.loads(repaired.stdout)[0]["requested"] >= 1
    assert_whole(grid, [ds])

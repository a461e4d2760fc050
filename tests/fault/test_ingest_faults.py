"""Ingest when a part of the grid fails: the sender gets a failure status, nothing acknowledged is lost."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from dicomgrid import schemas
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.kafka import wait_for_topics
from dicomgrid.deploy.local import LocalCluster
from dicomgrid.producers.ingest import Ingestor
from dicomgrid.core.dimse import SiteAE
from dicomgrid.producers.storage_scp import StorageService
from tests.dicom_samples import make_instance
from tests.fault.whole import assert_whole
from tests.grid import dc_serves, free_port, processors_joined, wait_for
from tests.integration.test_ingest_grid import c_store, events_for

pytestmark = [pytest.mark.cluster, pytest.mark.fault]


def test_kafka_down_fails_the_store_and_the_resend_succeeds_once(grid, taps, metadata_dc1):
    local = LocalCluster(grid.config)
    tap, audit_tap = taps(), taps(schemas.TOPIC_AUDIT)
    acknowledged = make_instance()
    assert c_store(grid.site("A"), [acknowledged]) == [0]
    assert events_for(tap, [acknowledged.SOPInstanceUID])

    ds = make_instance()
    local.stop_node("kafka")
    try:
        started = time.monotonic()
        statuses = c_store(grid.site("A"), [ds])
        elapsed = time.monotonic() - started
        # The site's readiness probe names what is missing; its own datacenter still answers.
        site = grid.site("A")
        health = httpx.get(f"http://{site.http_host}:{site.http_port}/health", timeout=30)
    finally:
        local.up()
        # Up is "answers metadata"; the grid's partitions get their leader back a moment later, and
        # the processors' group forms again after that.
        wait_for_topics(grid.config.kafka, timeout=60)
        wait_for(lambda: processors_joined(grid.config), timeout=90, interval=0.5)
    assert statuses == [0xA701], f"expected 'event log unavailable', got {statuses}"
    assert health.status_code == 503, health.text
    assert not health.json()["checks"]["kafka"]["ok"] and health.json()["checks"]["cassandra"]["ok"]
    assert elapsed < grid.config.kafka.delivery_timeout_s + 10

    # The PACS retries once the broker is back, until the receiver's producer has reconnected.
    wait_for(lambda: c_store(grid.site("A"), [ds]) == [0], timeout=60, interval=2)
    events = events_for(tap, [ds.SOPInstanceUID, acknowledged.SOPInstanceUID], n=2, timeout=60)
    mine = [e for e in events if e["instance"]["sop_instance_uid"] == ds.SOPInstanceUID]
    assert len(mine) == 1, "exactly one event for the instance the grid acknowledged"
    wait_for(lambda: metadata_dc1.instance_location(ds.SOPInstanceUID), timeout=60)
    # The instance acknowledged before the outage is still indexed and intact.
    location = metadata_dc1.instance_location(acknowledged.SOPInstanceUID)
    assert BlobStore(grid.config.site_storage("A"), "A").verify(location.sha256)
    assert_whole(grid, [acknowledged, ds])
    # The refusal was audited while Kafka was down: the record waited in site A's audit spool and was
    # published once the broker was back.
    def refusal(seen):
        return [r for r in seen if r["outcome"] == 8 and "event log unavailable" in r["outcome_description"]
                and any(o["id"] == ds.SOPInstanceUID for o in r["objects"])]

    assert len(refusal(audit_tap.collect(lambda seen: bool(refusal(seen)), timeout=60))) == 1


@pytest.fixture
def tiny_volume(tmp_path: Path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_fails_the_store_and_keeps_what_was_stored(grid, taps, publishers, tiny_volume, pynetdicom_settings):
    """A receiver whose blob store fills up answers 0xA700; earlier instances stay intact.

    The volume has room for a small instance but not for the next one, which runs out of space while
    its fragments are being written into the blob store: the moment a nearly full disk runs out.
    """
    site = grid.site("A").model_copy(update={"dicom_port": free_port(), "dicom_tls_port": free_port()})
    config = grid.config.model_copy(update={"sites": [site, grid.site("B")]})
    publisher = publishers(config.kafka, "test-disk-full")
    blobs = BlobStore(tiny_volume, "A")
    ingestor = Ingestor("A", blobs, publisher, None, AuditTrail("A", publisher), delivery_timeout_s=6.0)
    storage = StorageService(ingestor, site.ae_title)
    server = SiteAE(config, "A", [storage], ingestor.audit).serve(spool_dir=storage.spool_dir, block=False)
    tap = taps()
    audit_tap = taps(schemas.TOPIC_AUDIT)
    try:
        small = make_instance()
        assert c_store(site, [small]) == [0]
        big = make_instance()
        big.PixelData = os.urandom(800 * 1024)
        assert c_store(site, [big]) == [0xA700]
        # What was acknowledged is still there, byte for byte.
        event = events_for(tap, [small.SOPInstanceUID])[0]
        assert blobs.verify(event["payload"]["sha256"])
        assert not list((tiny_volume / "tmp").iterdir()), "no partial payload left behind"
        tap.catch_up()
        assert not [e for e in tap.seen if e["instance"]["sop_instance_uid"] == big.SOPInstanceUID]
        audits = audit_tap.collect(lambda seen: any(a["outcome"] == 8 for a in seen))
        assert any(a["outcome"] == 8 and "out of resources" in a["outcome_description"] for a in audits)
    finally:
        server.shutdown()
        server.server_close()


def test_cassandra_node_down_does_not_stop_ingest_and_the_index_catches_up(grid, taps, metadata_dc2):
    """Site A's datacenter goes down mid-stream: A still acknowledges durable instances (Kafka is the
    durability boundary), and once the node is back the indexer catches up with nothing lost."""
    local = LocalCluster(grid.config)
    tap = taps()
    before = make_instance()
    assert c_store(grid.site("A"), [before]) == [0]
    wait_for(lambda: metadata_dc2.instance_location(before.SOPInstanceUID), timeout=60)

    during = [make_instance() for _ in range(3)]
    local.stop_node("cassandra-dc1")
    try:
        assert c_store(grid.site("A"), during) == [0, 0, 0]
        assert len(events_for(tap, [ds.SOPInstanceUID for ds in during], timeout=60)) == 3
    finally:
        local.up()
        wait_for(lambda: dc_serves(grid.config, "dc1"), timeout=60, interval=0.5)
    for ds in [before, *during]:
        location = wait_for(lambda ds=ds: metadata_dc2.instance_location(ds.SOPInstanceUID), timeout=120, interval=1)
        assert BlobStore(grid.config.site_storage("A"), "A").verify(location.sha256)

"""The fault matrix: real processes killed or stopped, real data lost; each scenario ends whole.

Every scenario ends with :func:`tests.fault.whole.assert_whole`: every instance that got 0x0000 is
stored byte-identical at ``min_copies`` sites, verified in the ledger and indexed in every datacenter,
and nothing that was never acknowledged exists. (A replication worker killed mid-transfer and Kafka
stopped during ingest are in test_replication_faults.py and test_ingest_faults.py, with the same end.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.deploy.local import LocalCluster
from tests.dicom_samples import make_instance
from tests.fault.whole import assert_whole
from tests.grid import dc_serves, wait_for
from tests.integration.test_ingest_grid import c_store

pytestmark = [pytest.mark.cluster, pytest.mark.fault]


def _service(grid, name: str):
    return next(s for s in grid.supervisor.services() if s.name == name)


def _cli(grid, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(grid.config_file), *args],
                          capture_output=True, text=True, timeout=timeout)


def _find_at(site, study_uid: str) -> list[int]:
    """Statuses of a study-level C-FIND for one study at ``site``."""
    from pydicom.dataset import Dataset

    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    try:
        return [status.Status for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()


def test_a_receiver_killed_mid_association_loses_nothing_acknowledged(grid):
    site = grid.site("A")
    receiver = grid.supervisor.daemon(_service(grid, "A/receiver-1"))
    before = [make_instance() for _ in range(5)]
    in_flight = make_instance()
    in_flight.PixelData = os.urandom(2 << 20)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    ae.maximum_pdu_size = 16384
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established
    assert [assoc.send_c_store(ds).Status for ds in before] == [0] * len(before)
    sent = {"pdus": 0}

    def kill_midway(event: evt.Event) -> None:
        sent["pdus"] += 1
        if sent["pdus"] == 4:  # the command and a few data set fragments of in_flight are out
            os.kill(receiver.pid(), signal.SIGKILL)

    assoc.bind(evt.EVT_PDU_SENT, kill_midway)
    try:
        status = assoc.send_c_store(in_flight)
    except Exception:
        status = None
    assoc.abort()
    assert not getattr(status, "Status", None) == 0x0000, "a killed receiver cannot have acknowledged"
    grid.supervisor.up(timeout=90)  # the receiver is back (restarted by the supervisor or here)
    # The PACS resends what it has not been told is stored, and sends on.
    after = [make_instance() for _ in range(5)]
    resent = make_instance(sop_uid=in_flight.SOPInstanceUID, study_uid=in_flight.StudyInstanceUID,
                           series_uid=in_flight.SeriesInstanceUID)
    assert c_store(site, [resent, *after]) == [0] * 6
    assert_whole(grid, [*before, resent, *after])


def test_dc1_stopped_while_site_b_ingests_and_answers_queries(grid, metadata_dc2):
    local = LocalCluster(grid.config)
    site_b = grid.site("B")
    study = make_instance().StudyInstanceUID
    first = make_instance(study_uid=study)
    assert c_store(site_b, [first]) == [0]
    wait_for(lambda: metadata_dc2.instance_location(first.SOPInstanceUID), timeout=60)
    during = [make_instance(study_uid=study) for _ in range(5)]
    local.stop_node("cassandra-dc1")
    try:
        status = _cli(grid, "status", timeout=60)
        assert status.returncode != 0 and "DEGRADED: site A's Cassandra datacenter dc1 is down" in status.stdout
        assert c_store(site_b, during) == [0] * len(during)
        # Site B's index (dc2, LOCAL_QUORUM) goes on answering, with what was stored during the outage.
        wait_for(lambda: all(metadata_dc2.instance_location(ds.SOPInstanceUID) for ds in during), timeout=60)
        statuses = _find_at(site_b, study)
        assert statuses[-1] == 0x0000 and 0xFF00 in statuses
    finally:
        local.up()
        wait_for(lambda: dc_serves(grid.config, "dc1"), timeout=90, interval=0.5)
    assert_whole(grid, [first, *during], timeout=180)


def test_site_b_stopped_catches_up_from_its_committed_offsets(grid):
    services = [_service(grid, f"B/{kind}") for kind in ("processors", "replicator")]
    for service in services:
        grid.supervisor.stop_service(service, 30)
    try:
        stored = [make_instance() for _ in range(60)]
        assert c_store(grid.site("A"), stored) == [0] * len(stored)
    finally:
        grid.supervisor.up(timeout=90)
    assert_whole(grid, stored, timeout=180)


def test_a_lost_blob_store_is_recovered_and_corrupt_copies_are_scrubbed(grid, taps):
    stored = [make_instance(pixel_bytes=4096) for _ in range(40)]
    assert c_store(grid.site("A"), stored) == [0] * len(stored)
    assert_whole(grid, stored)
    b = BlobStore(grid.config.site_storage("B"), "B")
    held = sorted(b.digests())

    # Site B loses its whole disk; its worker is stopped so only recovery puts things back.
    grid.supervisor.stop_service(_service(grid, "B/replicator"), 30)
    try:
        shutil.rmtree(b.root / "sha256")
        (b.root / "sha256").mkdir()
        done = _cli(grid, "recover", "--site", "B", "--json")
        report = json.loads(done.stdout)
        assert report["planned"] >= len(held) and report["copied"] >= len(held)
        assert set(b.digests()) >= set(held)
        # The session's index also lists payloads of in-process test ingestors that kept them in a
        # temporary directory: no site can provide those, and recovery says so (and exits non-zero).
        a = BlobStore(grid.config.site_storage("A"), "A")
        assert set(report["failed"]) <= {"no intact copy at any other site"}
        assert not any(a.exists(digest) for digest in report["unavailable"])
        assert done.returncode == (1 if report["failed"] else 0), done.stderr
        assert_whole(grid, stored)

        # Then 5% of its copies rot.
        finding_tap = taps(schemas.TOPIC_SCRUB_FINDING)
        rotten = random.Random(7).sample(sorted(b.digests()), max(2, len(held) // 20))
        for digest in rotten:
            path = b.path(digest)
            os.chmod(path, 0o644)
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        unavailable = set(report["unavailable"])
        done = _cli(grid, "scrub", "--site", "B", "--json")
        report = json.loads(done.stdout)
        assert report["corrupt"] == len(rotten) and report["repaired"] == len(rotten)
        # What no site could provide to the recovery stays missing, and the scrub says so.
        assert set(report["unrepaired"]) == unavailable and report["missing"] == len(unavailable)
        assert done.returncode == (1 if unavailable else 0), done.stderr
        assert report["complete"] and report["checked"] >= len(held)
        assert all(b.verify(digest) for digest in rotten)
        quarantined = {p.name.split(".")[0] for p in (b.root / "quarantine").iterdir()}
        assert set(rotten) <= quarantined
        findings = finding_tap.collect(lambda seen: len({f["sha256"] for f in seen} & set(rotten)) == len(rotten))
        for finding in findings:
            schemas.validate_event(schemas.TOPIC_SCRUB_FINDING, finding)
        assert {(f["sha256"], f["finding"], f["outcome"], f.get("repaired_from")) for f in findings
                if f["sha256"] in rotten} == {(d, "corrupt", "repaired", "A") for d in rotten}
    finally:
        grid.supervisor.up(timeout=90)
    assert_whole(grid, stored)

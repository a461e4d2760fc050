"""A site cut off from the other keeps working: a Kafka cluster per site, events mirrored by MirrorMaker 2.

The test runs a two-site grid of its own: one small KRaft broker per site and a dedicated MirrorMaker 2
process (started by the local launcher, their files under ``<data dir>/run/site-clusters/<grid>``), the shared Cassandra
cluster (dc1 for site A, dc2 for site B, in a keyspace of the test's own) and the grid's services.

The partition: MirrorMaker is stopped (no event crosses between the clusters) and every service of
site B is stopped, so site A reaches neither B's events nor B's payload endpoint. B's Cassandra node
is the shared cluster's and stays up (other sessions use it); site A never needs it anyway: it reads
and writes at LOCAL_QUORUM in dc1. During the partition A answers every C-STORE with 0x0000, indexes
and answers C-FIND for everything it received, keeps the new instances below min_copies (the ledger
lists A only, and a Storage Commitment request for some of them is reported failed, 0x0110) and
`dicomgrid status` names the partition. When the link is back, MirrorMaker catches up from its stored offsets, B indexes and
replicates what it missed, and the grid is whole (tests/fault/whole.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from dicomgrid import schemas
from dicomgrid.core.cassandra import Cassandra, apply_schema
from dicomgrid.core.kafka import ensure_grid_topics
from dicomgrid.core.ledger import ReplicaLedger
from dicomgrid.core.links import links
from dicomgrid.deploy.local import LocalCluster
from dicomgrid.supervisor import Supervisor
from tests.dicom_samples import make_instance
from tests.fault.whole import assert_whole
from tests.grid import TEST_GRID_PREFIX, end_offsets, free_port, partitions_of, wait_for, write_test_config
from tests.grid_fixtures import Grid, _orphaned, drop_keyspace
from tests.integration.test_ingest_grid import c_store
from tests.integration.test_query import FindSCU
from tests.integration.test_storage_commitment import Requestor, refs, sequence
from tests.grid import COMMIT_SCU

pytestmark = [pytest.mark.cluster, pytest.mark.fault]

# The issue asks for 200 instances; they fit the suite's budget (small instances, one association).
INSTANCES = int(os.environ.get("DICOMGRID_PARTITION_INSTANCES", "200"))
# How long the sites stay cut off after the last instance was acknowledged at A.
PARTITION_S = float(os.environ.get("DICOMGRID_PARTITION_HOLD_S", "30"))
CATCH_UP_TIMEOUT_S = 180.0

SITE_KINDS = ("receiver", "http", "processors", "replicator")


def _broker_port() -> int:
    """A free port whose successor (the broker's controller port) is free too."""
    while True:
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def _infra_root(cluster_root: Path) -> Path:
    """Where the test grids' brokers and MirrorMaker live: beside the shared cluster's files, so a
    later session finds (and stops) those of a session that died without cleaning up."""
    return cluster_root / "run" / "site-clusters"


def _stop_orphaned_site_clusters(cluster_root: Path) -> None:
    for infra_dir in _infra_root(cluster_root).glob(f"{TEST_GRID_PREFIX}*"):
        if _orphaned(infra_dir.name):
            Supervisor.stop_pid_files(infra_dir / "run", grace=30)
            shutil.rmtree(infra_dir, ignore_errors=True)


def _per_site_config(base: Path, name: str, data_dir: Path, infra_dir: Path) -> Path:
    path = write_test_config(base / "grid.toml", name, data_dir, base / "sites")
    text = path.read_text()
    ports = {"A": _broker_port(), "B": _broker_port()}
    for site, dc in (("A", "dc1"), ("B", "dc2")):
        text = text.replace(f'cassandra_dc = "{dc}"\n',
                            f'cassandra_dc = "{dc}"\nkafka_bootstrap_servers = "127.0.0.1:{ports[site]}"\n')
    # No Parquet sink (not under test here).
    head, sites = text.split("[[sites]]", 1)
    head = head.replace("[analytics]\n", "[analytics]\nsites = []\n")
    path.write_text(head + f'[infra]\nlocal_dir = "{infra_dir}"\n[[sites]]' + sites)
    return path


def _mirrored_behind(grid: Grid) -> int:
    """Events of site A's instance topic not yet in its mirror in site B's cluster."""
    config = grid.config
    own = config.kafka.topic(schemas.TOPIC_INSTANCE_STORED)
    a, b = AdminClient(config.site_kafka("A").client_config()), AdminClient(config.site_kafka("B").client_config())
    source = end_offsets(a, partitions_of(a, own))
    mirror = end_offsets(b, partitions_of(b, f"A.{own}"))
    return sum(end - mirror.get(p, 0) for p, end in source.items())


def _status(grid: Grid) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(grid.config_file), "status"],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site_grid(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Grid, LocalCluster]]:
    _stop_orphaned_site_clusters(cluster.root)
    base = tmp_path_factory.mktemp("partition")
    name = f"{TEST_GRID_PREFIX}{os.getpid()}-sites"
    infra_dir = _infra_root(cluster.root) / name
    config_file = _per_site_config(base, name, cluster.root, infra_dir)
    from tests.grid import load_test_config

    config = load_test_config(config_file)
    assert config.kafka_per_site
    infra = LocalCluster(config)
    supervisor = Supervisor(config, str(config_file))
    try:
        # Only this grid's brokers and MirrorMaker: the shared Cassandra nodes are never touched.
        for broker in ("kafka-A", "kafka-B"):
            infra.start_node(broker, timeout=120)
        apply_schema(config)
        ensure_grid_topics(config)
        infra.start_node("mirrormaker", timeout=120)
        supervisor.up(timeout=120)
        yield Grid(config, config_file, supervisor), infra
    finally:
        supervisor.down()
        for component in ("mirrormaker", "kafka-A", "kafka-B"):
            infra.stop_node(component)
        shutil.rmtree(supervisor.run_dir, ignore_errors=True)
        shutil.rmtree(infra_dir, ignore_errors=True)
        drop_keyspace(cluster, config.cassandra.keyspace)


def test_a_partitioned_site_keeps_working_and_the_grid_heals(site_grid, record_property):
    grid, infra = site_grid
    config = grid.config

    # The link works: an instance stored at A is indexed and copied at B, by way of MirrorMaker.
    warm = make_instance(patient_id="PART-WARM")
    assert c_store(grid.site("A"), [warm]) == [0x0000]
    assert_whole(grid, [warm], timeout=120)
    wait_for(lambda: not any(link.partitioned for link in links(config)), timeout=30, interval=1.0)

    # Partition: no mirroring, and nothing of site B answers.
    infra.stop_node("mirrormaker")
    for service in grid.supervisor.services():
        if service.site == "B" and service.kind in SITE_KINDS:
            grid.supervisor.stop_service(service, 30)
    cut_at = time.monotonic()

    first = make_instance()
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    datasets = [make_instance(study_uid=study, series_uid=series, patient_id="PART-1", patient_name="Cut^Off")
                for _ in range(INSTANCES)]
    started = time.monotonic()
    statuses = c_store(grid.site("A"), datasets)
    ingest_s = time.monotonic() - started
    assert statuses == [0x0000] * INSTANCES, f"refused: {sorted({hex(s) for s in statuses if s})}"

    # Storage Commitment for new instances: they cannot reach min_copies while B is cut off.
    requestor = Requestor(COMMIT_SCU, config.remote_aes[COMMIT_SCU].port)
    server = requestor.listen()
    asked = requestor.request(grid.site("A"), refs(datasets[:3]))
    assert asked.status == 0x0000

    # Indexed in A's own datacenter, answered by A's C-FIND; below min_copies (A holds the only copy).
    reader_a = grid.metadata("dc1")
    ledger_a = ReplicaLedger(reader_a.db)
    try:
        def indexed_at_a() -> bool:
            return all(reader_a.instance_row(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
                       is not None for ds in datasets)

        wait_for(indexed_at_a, timeout=60, interval=0.5)
        scu = FindSCU(grid.site("A"))
        try:
            matches, final = scu.find("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID="")
        finally:
            scu.close()
        assert final.Status == 0x0000
        assert {m.SOPInstanceUID for m in matches} == {ds.SOPInstanceUID for ds in datasets}
        some = reader_a.instance_location(datasets[0].SOPInstanceUID)
        assert ledger_a.verified_sites(some.sha256) == {"A"}, "a copy reached B through the partition"
    finally:
        reader_a.db.close()

    # `dicomgrid status` names the partition (MirrorMaker's last heartbeat is a few seconds old).
    def reported() -> subprocess.CompletedProcess[str] | None:
        status = _status(grid)
        mm2_down = any(line.startswith("mirrormaker") and "DOWN" in line for line in status.stdout.splitlines())
        return status if mm2_down else None

    status = wait_for(reported, timeout=30, interval=1.0)
    assert status.returncode != 0
    assert "PARTITIONED: site A is cut off from site B" in status.stdout, status.stdout
    assert "PARTITIONED: site B is cut off from site A" in status.stdout, status.stdout

    try:
        report = requestor.report_for(asked.transaction_uid, timeout=config.storage_commitment.timeout_s + 30)
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    assert report.event_type == 2, "instances below min_copies were reported committed"
    assert sequence(report, "FailedSOPSequence") == [(*ref, 0x0110) for ref in refs(datasets[:3])]

    remaining = PARTITION_S - (time.monotonic() - cut_at)
    if remaining > 0:
        time.sleep(remaining)
    partition_s = time.monotonic() - cut_at

    # The link is back: MirrorMaker resumes from its stored offsets, B's services come back.
    restored = time.monotonic()
    infra.start_node("mirrormaker", timeout=120)
    grid.supervisor.up(timeout=120)
    wait_for(lambda: _mirrored_behind(grid) == 0, timeout=CATCH_UP_TIMEOUT_S, interval=0.5)
    mirrored_s = time.monotonic() - restored
    assert_whole(grid, [warm, *datasets], timeout=CATCH_UP_TIMEOUT_S)
    whole_s = time.monotonic() - restored

    # Both datacenters' ledgers agree: every instance verified at A and B, nothing else.
    dbs = {dc: Cassandra(config, local_dc=dc) for dc in ("dc1", "dc2")}
    try:
        readers = {dc: grid.metadata(dc) for dc in dbs}
        for ds in datasets:
            digest = readers["dc1"].instance_location(ds.SOPInstanceUID).sha256
            assert readers["dc2"].instance_location(ds.SOPInstanceUID).sha256 == digest
            views = {dc: ReplicaLedger(db).verified_sites(digest) for dc, db in dbs.items()}
            assert views == {"dc1": {"A", "B"}, "dc2": {"A", "B"}}, views
        for reader in readers.values():
            reader.db.close()
    finally:
        for db in dbs.values():
            db.close()
    wait_for(lambda: not any(link.partitioned for link in links(config)), timeout=60, interval=1.0)

    for key, value in (("instances", INSTANCES), ("ingest_s", round(ingest_s, 1)),
                       ("partition_s", round(partition_s, 1)), ("mirror_catch_up_s", round(mirrored_s, 1)),
                       ("whole_after_restore_s", round(whole_s, 1))):
        record_property(key, value)
    print(f"\npartition of {partition_s:.0f} s, {INSTANCES} instances ingested at A in {ingest_s:.1f} s; "
          f"after the link returned: mirrored in {mirrored_s:.1f} s, whole (B holds and indexes all, "
          f"ledgers agree) in {whole_s:.1f} s")

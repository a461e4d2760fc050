"""The grid under benchmark: one site with every durability guarantee on, on the shared local cluster.

Like the test grids (tests/grid.py) it has its own name (pid files, consumer group), free ports, its own
keyspace, blob store and Kafka topics (a prefix per benchmark process, deleted when it stops), so it never
disturbs a development grid or a test session, and indexes only what it ingests. Its services are
run by the grid's own :class:`~dicomgrid.supervisor.Supervisor`, exactly as ``dicomgrid up`` runs them.

Two configurations differ only in ``receiver_processes`` (1 or 2, sharing the port with SO_REUSEPORT);
switching restarts the receivers and keeps the DICOMweb and stream-processor services running.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
from confluent_kafka.admin import AdminClient

from bench.corpus import InstanceKey, RunCorpus
from bench.paths import BENCH_ROOT
from bench.storescu import CALLING_AE, SendResult, dcmtk_env
from bench.targets import RunCheck, free_port
from dicomgrid.core.config import GridConfig, load_config
from dicomgrid.core.kafka import delete_topics, ensure_topics
from dicomgrid.core.metadata import MetadataStore, apply_schema
from dicomgrid.deploy.local import LocalCluster
from dicomgrid.supervisor import Supervisor

NAME = "dicomgrid-bench"
# Topics of this benchmark process: "<NAME>-<pid>.dicom.instance.stored", ...
TOPIC_PREFIX = f"{NAME}-{os.getpid()}."
KEYSPACE = "dicomgrid_bench"
SITE = "A"
AE_TITLE = "GRID_BENCH"
DC = "dc1"
# How long after the last C-STORE response the index may take before the run counts as not indexed.
INDEX_TIMEOUT_S = 120.0
POLL_S = 0.02


class BenchGrid:
    """Starts, reconfigures and stops the bench grid; knows its processes and its index."""

    def __init__(self) -> None:
        self.dir = BENCH_ROOT / "grid"
        self.storage = self.dir / "sites" / SITE / "blobs"
        self.dicom_port, self.http_port = free_port(), free_port()
        self.cluster_config = load_config()
        self.receivers = 0  # receiver processes running now
        self.metadata: MetadataStore | None = None
        self._configs: dict[int, GridConfig] = {}
        self._jvms: dict[str, list[psutil.Process]] = {}
        self._services: dict[str, list[psutil.Process]] = {}

    def config_file(self, receivers: int) -> Path:
        """The config of the grid with ``receivers`` receiver processes (written on first use)."""
        path = self.dir / f"grid-{receivers}rx.toml"
        if receivers not in self._configs:
            self.dir.mkdir(parents=True, exist_ok=True)
            # dc2 = 0: one site, one datacenter (the shipped defaults name two, and tables merge).
            path.write_text(
                f'name = "{NAME}"\ndata_dir = "{self.cluster_config.root}"\nlog_level = "INFO"\n'
                f'[kafka]\ntopic_prefix = "{TOPIC_PREFIX}"\n'
                f'[cassandra]\nkeyspace = "{KEYSPACE}"\nreplication = {{ dc1 = 1, dc2 = 0 }}\n'
                f'[security]\nallowed_calling_aes = ["{CALLING_AE}", "FINDSCU", "GETSCU", "MOVESCU", "ECHOSCU"]\n'
                f'[[sites]]\nname = "{SITE}"\nae_title = "{AE_TITLE}"\ndicom_port = {self.dicom_port}\n'
                f'http_port = {self.http_port}\nstorage_root = "{self.storage}"\ncassandra_dc = "{DC}"\n'
                f"receiver_processes = {receivers}\n"
            )
            self._configs[receivers] = load_config(path)
        return path

    def config(self, receivers: int = 1) -> GridConfig:
        self.config_file(receivers)
        return self._configs[receivers]

    def supervisor(self, receivers: int) -> Supervisor:
        return Supervisor(self.config(receivers), str(self.config_file(receivers)))

    def start(self) -> None:
        """Cluster up (reused when healthy), schema and topics, a clean blob store, then the services."""
        if self.metadata is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.config()
        status = LocalCluster(config).up()
        for component in status.components:
            if component.pid:
                self._jvms[component.name] = [psutil.Process(component.pid)]
        # Services of an earlier, interrupted benchmark would hold stale ports and files.
        Supervisor.stop_pid_files(self.supervisor(1).run_dir)
        shutil.rmtree(self.storage, ignore_errors=True)
        _delete_orphaned_topics(config)
        apply_schema(config)
        ensure_topics(config.kafka)
        self.use(1)
        self.metadata = MetadataStore(config, local_dc=DC)
        # Connect and prepare now, so the first lag probe measures the index and not the driver.
        self.metadata.instance_location("0.0")

    def use(self, receivers: int) -> None:
        """Run exactly ``receivers`` receiver processes (others services untouched)."""
        if receivers == self.receivers:
            return
        if self.receivers:
            current = self.supervisor(self.receivers)
            for service in current.services():
                if service.kind == "receiver":
                    current.daemon(service).stop(20.0)
        supervisor = self.supervisor(receivers)
        self._services = {"receivers": [], "processors": [], "http": []}
        for status in supervisor.up(timeout=120):
            group = "receivers" if status.service.kind == "receiver" else status.service.kind
            self._services[group].append(psutil.Process(status.pid))
        self.receivers = receivers
        self._wait_echo()

    def _wait_echo(self, timeout: float = 60.0) -> None:
        """Wait for a C-ECHO to succeed: the supervisor's probe only shows that some process accepts."""
        argv = ["echoscu", "-aet", "ECHOSCU", "-aec", AE_TITLE, "127.0.0.1", str(self.dicom_port)]
        deadline = time.monotonic() + timeout
        while subprocess.run(argv, capture_output=True, env=dcmtk_env()).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench grid does not answer C-ECHO on port {self.dicom_port}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.metadata is not None:
            self.metadata.close()
            self.metadata = None
        run_dir = self.supervisor(1).run_dir
        Supervisor.stop_pid_files(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(self.storage, ignore_errors=True)
        delete_topics(self.config().kafka)
        self.receivers = 0

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Receivers, HTTP and processors of the site, then the cluster's JVMs."""
        return {**self._services, **self._jvms}

    def versions(self) -> dict[str, str]:
        assert self.metadata is not None
        cassandra = self.metadata.execute("SELECT release_version FROM system.local").one()[0]
        return {"Kafka": self.cluster_config.infra.kafka_version, "Cassandra": cassandra}

    def _located(self, key: InstanceKey) -> bool:
        assert self.metadata is not None
        return self.metadata.instance_location(key.sop_instance_uid) is not None

    def _indexed(self, key: InstanceKey) -> bool:
        assert self.metadata is not None
        row = self.metadata.execute(
            "SELECT sop_instance_uid FROM instances WHERE study_uid = ? AND series_uid = ? AND sop_instance_uid = ?",
            (key.study_uid, key.series_uid, key.sop_instance_uid),
        ).one()
        return row is not None

    def wait_indexed(self, corpus: RunCorpus, sent: SendResult) -> RunCheck:
        """Time from the last C-STORE response until the last instance of every association is visible,
        in ``instance_locations`` and in ``instances`` (what C-FIND and QIDO-RS read); then how many of
        the run's instances the index holds."""
        assert self.metadata is not None
        lags: dict[str, float] = {}
        probes = {"location": self._located, "index": self._indexed}
        pending = {name: set(corpus.last) for name in probes}
        while pending and time.time() < sent.last_response + INDEX_TIMEOUT_S:
            for name in list(pending):
                pending[name] = {key for key in pending[name] if not probes[name](key)}
                if not pending[name]:
                    lags[name] = max(0.0, time.time() - sent.last_response)
                    del pending[name]
            time.sleep(POLL_S)
        # Batches are indexed concurrently: an earlier instance can land after the last one.
        deadline = time.monotonic() + (30.0 if "index" in lags else 0.0)
        while True:
            indexed = sum(
                self.metadata.execute("SELECT COUNT(*) FROM instances WHERE study_uid = ?", (study,)).one()[0]
                for study in corpus.study_uids
            )
            if indexed >= corpus.count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        note = "" if not pending else f"not visible within {INDEX_TIMEOUT_S:.0f}s in: {', '.join(pending)}"
        return RunCheck(indexed, lags.get("index"), lags.get("location"), note)


def _delete_orphaned_topics(config: GridConfig) -> None:
    """Delete the topics of earlier benchmark processes that ended without deleting them."""
    topics = AdminClient(config.kafka.client_config()).list_topics(timeout=10).topics
    for prefix in {t.split(".", 1)[0] for t in topics if t.startswith(f"{NAME}-")}:
        owner = prefix.removeprefix(f"{NAME}-")
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            delete_topics(config.kafka.model_copy(update={"topic_prefix": f"{prefix}."}))


class GridTarget:
    """The bench grid seen as one target: with 1 receiver process (the default) or with several."""

    ae_title, primary = AE_TITLE, "receivers"

    def __init__(self, grid: BenchGrid, receivers: int) -> None:
        self.grid = grid
        self.receivers = receivers
        self.port = grid.dicom_port
        self.key = "grid" if receivers == 1 else f"grid-{receivers}rx"
        self.label = "dicomgrid" if receivers == 1 else f"dicomgrid, {receivers} receivers"

    def start(self) -> None:
        self.grid.start()

    def activate(self) -> None:
        self.grid.use(self.receivers)

    def stop(self) -> None:
        self.grid.stop()

    def groups(self) -> dict[str, list[psutil.Process]]:
        return self.grid.processes()

    def before_run(self) -> None:
        pass

    def after_run(self, corpus: RunCorpus, sent: SendResult) -> RunCheck:
        return self.grid.wait_indexed(corpus, sent)

    def describe(self) -> dict[str, object]:
        config = self.grid.config(self.receivers)
        return {
            "version": importlib.metadata.version("dicomgrid"),
            "receiver_processes": self.receivers,
            "durability": "blob fsync + atomic rename + directory fsync; Kafka acks=all, idempotent producer, "
            f"min.insync.replicas={config.kafka.min_insync_replicas}",
            "kafka": f"{config.infra.kafka_version} (one KRaft broker)",
            "cassandra": f"{config.infra.cassandra_version}, keyspace {KEYSPACE} (dc1 RF 1)",
            "pynetdicom": importlib.metadata.version("pynetdicom"),
            "pydicom": importlib.metadata.version("pydicom"),
        }

"""The grids under benchmark: sites with every durability guarantee on, on the shared local cluster.

Like the test grids (tests/grid.py) each has its own name (pid files, consumer group), free ports, its own
keyspace, blob store and Kafka topics (a prefix per grid and benchmark process, deleted when it stops), so
it never disturbs a development grid or a test session, and indexes only what it ingests. Its services are
run by the grid's own :class:`~dicomgrid.supervisor.Supervisor`, exactly as ``dicomgrid up`` runs them.

A :class:`GridLayout` says which grid: the one-site grid every section measures by default
(:data:`ONE_SITE`), the two-site grid of the replication sections (:data:`TWO_SITES`: each site
replicates to the other and runs its replication worker), or a grid that only answers queries over a
loaded metadata-scale keyspace (:func:`scale_layout`). Configurations of one
layout differ only in ``receiver_processes`` (1 or 2, sharing the port with SO_REUSEPORT); switching
restarts the receivers and keeps the other services running.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tenacity
from cassandra import OperationTimedOut
from cassandra.cluster import NoHostAvailable

from bench.corpus import InstanceKey, RunCorpus
from bench.events import Tap
from bench.paths import BENCH_ROOT
from bench.retired import retire
from bench.storescu import CALLING_AE, SendResult, dcmtk_env
from bench.targets import RunCheck, free_port
from dicomgrid.core.blobstore import entry_durable_with_file, filesystem_type
from dicomgrid.core.config import GridConfig, load_config
from confluent_kafka.admin import AdminClient

from dicomgrid import schemas
from dicomgrid.core.kafka import delete_topics, ensure_topics
from dicomgrid.core.cassandra import Cassandra, apply_schema
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.pki import ensure_material
from dicomgrid.deploy.local import LocalCluster
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool
from dicomgrid.supervisor import Service, Supervisor

# How long after the last C-STORE response the index may take before the run counts as not indexed.
INDEX_TIMEOUT_S = 120.0
POLL_S = 0.02
REPLICATION_POLL_S = 0.25
SERVICE_START_S = 120.0
# Calling AE titles the bench's clients use (DCMTK's defaults and the harness's pynetdicom clients).
CLIENT_AES = (CALLING_AE, "FINDSCU", "GETSCU", "MOVESCU", "ECHOSCU")
ALL_SERVICES = ("receiver", "http", "processors")


@dataclass(frozen=True)
class BenchSite:
    name: str
    ae_title: str
    dc: str  # the site's Cassandra datacenter


@dataclass(frozen=True)
class GridLayout:
    """One bench grid: name (run directory, consumer group), keyspace, sites and the services it runs."""

    name: str
    keyspace: str
    sites: tuple[BenchSite, ...]
    services: tuple[str, ...] = ALL_SERVICES

    @property
    def replication(self) -> dict[str, int]:
        """One replica in each datacenter a site uses; none in the others (the shipped defaults name two,
        and the tables would merge them in)."""
        used = {site.dc for site in self.sites}
        return {dc: int(dc in used) for dc in ("dc1", "dc2")}


ONE_SITE = GridLayout("dicomgrid-bench", "dicomgrid_bench", (BenchSite("A", "GRID_BENCH", "dc1"),))
TWO_SITES = GridLayout(
    "dicomgrid-bench-sites", "dicomgrid_bench_sites",
    (BenchSite("A", "GRID_BENCH_A", "dc1"), BenchSite("B", "GRID_BENCH_B", "dc2")),
    services=(*ALL_SERVICES, "replicator"),
)
# The one-site grid's AE title, which the sections' availability probes call.
AE_TITLE = ONE_SITE.sites[0].ae_title


def scale_layout(keyspace: str, tag: str) -> GridLayout:
    """A one-site grid that only answers queries (receiver only) over a keyspace loaded beforehand.

    No stream processors: the shared topic carries other grids' events, and indexing them would add
    studies to the loaded set.
    """
    return GridLayout(f"dicomgrid-bench-scale-{tag}", keyspace, (BenchSite("A", "GRID_SCALE", "dc1"),),
                      services=("receiver",))


@dataclass(frozen=True)
class SitePorts:
    dicom: int
    http: int


class BenchGrid:
    """Starts, reconfigures and stops one bench grid; knows its processes and its index."""

    def __init__(self, layout: GridLayout = ONE_SITE) -> None:
        self.layout = layout
        self.dir = BENCH_ROOT / ("grid" if layout == ONE_SITE else layout.name)
        self.ports = {site.name: SitePorts(free_port(), free_port()) for site in layout.sites}
        self.site = layout.sites[0]  # where ingest, the index probes and the sections' clients go
        self.dicom_port, self.http_port = self.ports[self.site.name].dicom, self.ports[self.site.name].http
        self.cluster_config = load_config()
        self.receivers = 0  # receiver processes running now, per site
        self.metadata: IndexReader | None = None
        self._configs: dict[int, GridConfig] = {}
        self._jvms: dict[str, list[psutil.Process]] = {}
        self._services: dict[str, list[psutil.Process]] = {}
        self._by_name: dict[str, psutil.Process] = {}  # "A/http", "B/replicator", ...

    @property
    def topic_prefix(self) -> str:
        """This grid's topics: "<grid name>-<pid>.dicom.instance.stored", ..."""
        return f"{self.layout.name}-{os.getpid()}."

    def storage_of(self, site: str) -> Path:
        return self.dir / "sites" / site / "blobs"

    def config_file(self, receivers: int) -> Path:
        """The config of the grid with ``receivers`` receiver processes per site (written on first use)."""
        path = self.dir / f"grid-{receivers}rx.toml"
        if receivers not in self._configs:
            self.dir.mkdir(parents=True, exist_ok=True)
            replication = ", ".join(f"{dc} = {n}" for dc, n in self.layout.replication.items())
            sites = "".join(
                f'[[sites]]\nname = "{site.name}"\nae_title = "{site.ae_title}"\n'
                f"dicom_port = {self.ports[site.name].dicom}\nhttp_port = {self.ports[site.name].http}\n"
                f'storage_root = "{self.storage_of(site.name)}"\ncassandra_dc = "{site.dc}"\n'
                f"receiver_processes = {receivers}\n"
                f"replicate_to = {json.dumps([o.name for o in self.layout.sites if o is not site])}\n"
                for site in self.layout.sites
            )
            path.write_text(
                f'name = "{self.layout.name}"\ndata_dir = "{self.cluster_config.root}"\nlog_level = "INFO"\n'
                f'[kafka]\ntopic_prefix = "{self.topic_prefix}"\n'
                f'[cassandra]\nkeyspace = "{self.layout.keyspace}"\nreplication = {{ {replication} }}\n'
                f"[security]\nallowed_calling_aes = {json.dumps(list(CLIENT_AES))}\n"
                f'secrets_dir = "{self.dir / "secrets"}"\n'
                # Plain HTTP, as Orthanc is measured; DICOMweb still wants a token (bench.retrieve).
                f"[tls]\nhttp = false\n{sites}"
            )
            self._configs[receivers] = load_config(path)
        return path

    def config(self, receivers: int = 1) -> GridConfig:
        self.config_file(receivers)
        return self._configs[receivers]

    def supervisor(self, receivers: int) -> Supervisor:
        return Supervisor(self.config(receivers), str(self.config_file(receivers)))

    def start(self) -> None:
        """Cluster up (reused when healthy), schema and topics, empty blob stores (an earlier session's are
        retired, not deleted: :mod:`bench.retired`), then the services."""
        if self.metadata is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.config()
        ensure_material(config)  # what `dicomgrid up` makes in development: CA, certificates, token keys
        status = LocalCluster(config).up()
        for component in status.components:
            if component.pid:
                self._jvms[component.name] = [psutil.Process(component.pid)]
        # Services of an earlier, interrupted benchmark would hold stale ports and files.
        Supervisor.stop_pid_files(self.supervisor(1).run_dir)
        for site in self.layout.sites:
            retire(self.storage_of(site.name))
        # Fresh stores, so fresh healing schedules: a fresh site's first scrub and sweep come a period
        # after its first start, not during a measurement because an earlier session ran an hour ago.
        shutil.rmtree(config.root / "run" / "healing" / self.layout.name, ignore_errors=True)
        _delete_orphaned_topics(config)
        apply_schema(config)
        ensure_topics(config.kafka)
        self.use(1)
        self.metadata = IndexReader(Cassandra(config, local_dc=self.site.dc))
        # Connect and prepare now, so the first lag probe measures the index and not the driver. Other
        # sessions on the shared cluster create and drop keyspaces; a node busy with that schema churn
        # can be marked down by the driver for a moment.
        tenacity.Retrying(retry=tenacity.retry_if_exception_type((NoHostAvailable, OperationTimedOut)),
                          stop=tenacity.stop_after_delay(60), wait=tenacity.wait_fixed(2), reraise=True)(
            self.metadata.instance_location, "0.0")

    def use(self, receivers: int) -> None:
        """Run exactly ``receivers`` receiver processes per site (other services untouched)."""
        if receivers == self.receivers:
            return
        if self.receivers:
            current = self.supervisor(self.receivers)
            for service in current.services():
                if service.kind == "receiver":
                    current.daemon(service).stop(20.0)
        supervisor = self.supervisor(receivers)
        self._services = {}
        self._by_name = {}
        for service, pid in self._up(supervisor):
            group = "receivers" if service.kind == "receiver" else service.kind
            self._services.setdefault(group, []).append(psutil.Process(pid))
            self._by_name[service.name] = psutil.Process(pid)
        self.receivers = receivers
        for site in self.layout.sites:
            self._wait_echo(site)

    def _up(self, supervisor: Supervisor) -> list[tuple[Service, int]]:
        """Start the layout's services that are not running (a subset of what ``Supervisor.up`` runs, and
        unsupervised: a service restarted mid-run would skew the measurements); wait until all of them
        are healthy."""
        wanted = {service.name for service in supervisor.services() if service.kind in self.layout.services}
        for service in supervisor.services():
            daemon = supervisor.daemon(service)
            if service.name in wanted and daemon.pid() is None:
                supervisor.start_service(service)
        deadline = time.monotonic() + SERVICE_START_S
        while True:
            statuses = [s for s in supervisor.status() if s.service.name in wanted]
            dead = [s for s in statuses if not s.running]
            if dead:
                raise RuntimeError(f"{dead[0].service.name} of {self.layout.name} exited during start-up:\n"
                                   f"{supervisor.daemon(dead[0].service).excerpt()}")
            if all(s.healthy for s in statuses):
                return [(s.service, s.pid) for s in statuses if s.pid is not None]
            if time.monotonic() > deadline:
                slow = ", ".join(f"{s.service.name} ({s.detail})" for s in statuses if not s.healthy)
                raise RuntimeError(f"services of {self.layout.name} not healthy after {SERVICE_START_S:.0f}s: {slow}")
            time.sleep(0.3)

    def _wait_echo(self, site: BenchSite, timeout: float = 60.0) -> None:
        """Wait for a C-ECHO to succeed: the supervisor's probe only shows that some process accepts."""
        port = self.ports[site.name].dicom
        argv = [require_dcmtk_tool("echoscu"), "-aet", "ECHOSCU", "-aec", site.ae_title, "127.0.0.1", str(port)]
        deadline = time.monotonic() + timeout
        while subprocess.run(argv, capture_output=True, env=dcmtk_env()).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.layout.name} site {site.name} does not answer C-ECHO on port {port}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.metadata is not None:
            self.metadata.db.close()
            self.metadata = None
        run_dir = self.supervisor(1).run_dir
        Supervisor.stop_pid_files(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        for site in self.layout.sites:
            retire(self.storage_of(site.name))
        delete_topics(self.config().kafka)
        self.receivers = 0

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Receivers, HTTP and processors of the sites (and their replication workers), then the
        cluster's JVMs."""
        return {**self._services, **self._jvms}

    def jvms(self) -> dict[str, list[psutil.Process]]:
        """The cluster's JVMs: "kafka", "cassandra-dc1", ... (as of the last :meth:`refresh_jvms`)."""
        return dict(self._jvms)

    def refresh_jvms(self) -> dict[str, int]:
        """Look the cluster's JVMs up again (someone may have restarted a node since); their pids."""
        status = LocalCluster(self.cluster_config).status()
        self._jvms = {c.name: [psutil.Process(c.pid)] for c in status.components if c.pid}
        return {name: procs[0].pid for name, procs in self._jvms.items()}

    def process(self, name: str) -> psutil.Process:
        """The running process of one service, e.g. "A/http" or "B/replicator"."""
        return self._by_name[name]

    def process_or_none(self, name: str) -> psutil.Process | None:
        """:meth:`process`, or None when that service is not running."""
        proc = self._by_name.get(name)
        return proc if proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE else None

    def stop_service(self, name: str, grace: float = 30.0) -> None:
        """Stop one service of the grid (SIGTERM, as ``dicomgrid down`` does); the others keep running."""
        supervisor = self.supervisor(self.receivers)
        supervisor.daemon(self._service(supervisor, name)).stop(grace)
        self._forget(name)

    def start_service(self, name: str, overrides: str = "") -> psutil.Process:
        """Start one stopped service as the supervisor does; returns at once (the caller waits for
        whatever readiness it needs). ``overrides`` (TOML, e.g. ``"[replication]\nconcurrency = 16\n"``)
        are appended to the config of this one process."""
        supervisor = self.supervisor(self.receivers)
        service = self._service(supervisor, name)
        if overrides:
            base = self.config_file(self.receivers)
            variant = base.with_name(f"{base.stem}-{hashlib.sha256(overrides.encode()).hexdigest()[:8]}.toml")
            variant.write_text(base.read_text() + "\n" + overrides)
            # Same grid name, so the same pid file, logs and consumer groups; only the config differs.
            supervisor = Supervisor(load_config(variant), str(variant))
        proc = psutil.Process(supervisor.start_service(service).pid)
        group = "receivers" if service.kind == "receiver" else service.kind
        self._forget(name)
        self._services.setdefault(group, []).append(proc)
        self._by_name[name] = proc
        return proc

    @staticmethod
    def _service(supervisor: Supervisor, name: str) -> Service:
        try:
            return next(s for s in supervisor.services() if s.name == name)
        except StopIteration:
            raise KeyError(f"no service {name!r} in this grid") from None

    def _forget(self, name: str) -> None:
        proc = self._by_name.pop(name, None)
        if proc is not None:
            for procs in self._services.values():
                if proc in procs:
                    procs.remove(proc)

    def versions(self) -> dict[str, str]:
        assert self.metadata is not None
        cassandra = self.metadata.db.execute("SELECT release_version FROM system.local").one()[0]
        return {"Kafka": self.cluster_config.infra.kafka_version, "Cassandra": cassandra}

    def _located(self, key: InstanceKey) -> bool:
        assert self.metadata is not None
        return self.metadata.instance_location(key.sop_instance_uid) is not None

    def _indexed(self, key: InstanceKey) -> bool:
        assert self.metadata is not None
        row = self.metadata.db.execute(
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
                self.metadata.db.execute("SELECT COUNT(*) FROM instances WHERE study_uid = ?", (study,)).one()[0]
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
    for prefix in {t.split(".", 1)[0] for t in topics if t.startswith("dicomgrid-bench")}:
        owner = prefix.rsplit("-", 1)[-1]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            delete_topics(config.kafka.model_copy(update={"topic_prefix": f"{prefix}."}))


def _directory_fsync(path: Path) -> str:
    """What the blob store adds to a payload's fsync on the filesystem of ``path``."""
    kind = filesystem_type(path)
    if entry_durable_with_file(path):
        return f" (on {kind}, whose fsync of a new file also commits its directory entry)"
    return f" + directory fsync (on {kind or 'an unknown filesystem'})"


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
            "durability": f"blob atomic rename + fsync{_directory_fsync(self.grid.dir)}; Kafka acks=all, "
            f"idempotent producer, min.insync.replicas={config.kafka.min_insync_replicas}",
            "kafka": f"{config.infra.kafka_version} (one KRaft broker)",
            "cassandra": f"{config.infra.cassandra_version}, keyspace {self.grid.layout.keyspace} (dc1 RF 1)",
            "pynetdicom": importlib.metadata.version("pynetdicom"),
            "pydicom": importlib.metadata.version("pydicom"),
        }


class SitesTarget(GridTarget):
    """The two-site grid (:data:`TWO_SITES`) as a PACS at site A sees it, replication to B on: the
    figure a user of the default layout gets. A run ends once B holds a verified copy of every instance,
    so its CPU per instance includes the replication (B's worker, A's payload endpoint)."""

    ae_title = TWO_SITES.sites[0].ae_title

    def __init__(self, grid: BenchGrid) -> None:
        super().__init__(grid, 1)
        self.key = "grid-2sites"
        self.label = "dicomgrid, 2 sites (replication on)"
        self._ledger: Any = None
        self._tap: Tap | None = None  # dicom.replica.stored from just before the run on

    def start(self) -> None:
        super().start()
        from bench.availability import Ledger  # bench.availability imports this module

        self._ledger = Ledger(self.grid, TWO_SITES.sites[1])

    def stop(self) -> None:
        self._close_tap()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        super().stop()

    def before_run(self) -> None:
        self._close_tap()
        self._tap = Tap(self.grid.config(), schemas.TOPIC_REPLICA_STORED)

    def _close_tap(self) -> None:
        if self._tap is not None:
            self._tap.close()
            self._tap = None

    def after_run(self, corpus: RunCorpus, sent: SendResult) -> RunCheck:
        check = self.grid.wait_indexed(corpus, sent)
        assert self.grid.metadata is not None and self._ledger is not None and self._tap is not None
        digests = [row.sha256 for study in corpus.study_uids
                   for row in self.grid.metadata.instances_of_study(study) if row.sha256]
        # The copies are watched in the log first (B announces each copy just before it writes its
        # ledger row), which costs the grid nothing; the ledger is then asked once for the rows'
        # WRITETIMEs (the lag), and again, a few times a second, only for rows not written yet.
        # (Asking the ledger for every copy not yet seen, four times a second, had the probe read
        # about ten rows in Cassandra dc2 per replicated instance: CPU billed to this row.)
        copied: set[str] = set()
        looked_at = 0  # of the tap's events
        wanted = set(digests)

        def all_copied(seen: list[Any]) -> bool:
            nonlocal looked_at
            for event in (s.event for s in seen[looked_at:]):
                replica = event.get("replica") or {}
                if replica.get("site") == self._ledger.site:
                    copied.add(replica.get("sha256"))
            looked_at = len(seen)
            return wanted <= copied

        self._tap.until(all_copied, max(0.0, sent.last_response + INDEX_TIMEOUT_S - time.time()))
        self._close_tap()
        pending, written = set(digests), {}
        while time.time() < sent.last_response + INDEX_TIMEOUT_S:
            written.update(self._ledger.verified_written_many(sorted(pending)))
            pending.difference_update(written)
            if not pending:
                lag = max(written.values(), default=sent.last_response) - sent.last_response
                return dataclasses.replace(check, replication_lag_s=max(0.0, lag))
            time.sleep(REPLICATION_POLL_S)
        return dataclasses.replace(
            check, note="; ".join(filter(None, [check.note, f"not all replicated within {INDEX_TIMEOUT_S:.0f}s"])))

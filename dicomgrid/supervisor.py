"""Runs the grid's site services as detached processes: receivers, HTTP, stream processors, replication.

Each service is one ``python -m dicomgrid serve ...`` process with a pid file under
``<data_dir>/run/grid/<grid name>/`` and, under ``<data_dir>/logs/``, a log it writes itself (``.log``,
rotated) and its console output (``.out``), so ``dicomgrid up`` is idempotent (running services are kept)
and ``dicomgrid down`` works from any shell.
"""

from __future__ import annotations

import http.client
import logging
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import psutil
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicomgrid.core.config import GridConfig, SecurityConfig
from dicomgrid.core.daemon import Daemon

PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class DimseProbe:
    """A site AE to probe with C-ECHO."""

    host: str
    port: int
    called_ae: str


@dataclass(frozen=True)
class Service:
    site: str
    kind: str  # receiver | http | processors | replicator
    index: int
    argv: list[str]
    probe: DimseProbe | str | None  # C-ECHO, HTTP URL, or None (process liveness only)

    @property
    def name(self) -> str:
        return f"{self.site}/{self.kind}" + (f"-{self.index}" if self.kind == "receiver" else "")

    @property
    def slug(self) -> str:
        return self.name.replace("/", "-")


@dataclass(frozen=True)
class ServiceStatus:
    service: Service
    pid: int | None
    running: bool
    healthy: bool
    detail: str


class _ProbeAE(AE):
    """The C-ECHO requestor of the probes; what its associations log is dropped (:class:`_QuietProbes`)."""


class _QuietProbes(logging.Filter):
    """Drops pynetdicom's records about probe associations: a receiver that is still starting up fails
    several probes, each would log errors, and the outcome is in the service's status anyway."""

    probing = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self.probing, "active", False):
            return False
        thread = threading.current_thread()
        assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
        return not isinstance(getattr(assoc, "ae", None), _ProbeAE)


_QUIET = _QuietProbes()
for _module in ("acse", "association", "dimse", "dul", "fsm", "transport"):
    logging.getLogger(f"pynetdicom.{_module}").addFilter(_QUIET)


def probe_calling_ae(security: SecurityConfig) -> str:
    """The probe's calling AE title: ECHOSCU if the allow-list admits it, else the first allowed title."""
    allowed = security.allowed_calling_aes
    return "ECHOSCU" if not allowed or "ECHOSCU" in allowed else allowed[0]


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself has a listening TCP socket on ``port`` (every receiver of a pool
    has its own, with SO_REUSEPORT)."""
    try:
        connections = psutil.Process(pid).net_connections("tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def c_echo(probe: DimseProbe, calling_ae: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """C-ECHO the AE; None on success, else why it failed. The association is released, not left open."""
    ae = _ProbeAE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    _QUIET.probing.active = True
    try:
        assoc = ae.associate(probe.host, probe.port, ae_title=probe.called_ae)
        if assoc.is_rejected:
            return f"association rejected (calling AE {calling_ae}, called AE {probe.called_ae})"
        if not assoc.is_established:
            return "no association (refused, aborted or timed out)"
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        if "Status" not in status:
            return "no C-ECHO response"
        return None if status.Status == 0x0000 else f"C-ECHO status 0x{status.Status:04X}"
    finally:
        _QUIET.probing.active = False


def _http_ok(url: str) -> bool:
    """GET ``url`` answers 200 (plain http.client: no proxy settings apply, nothing is logged)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=1.0)
    try:
        connection.request("GET", parts.path or "/")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


class Supervisor:
    def __init__(self, config: GridConfig, config_file: str | None = None) -> None:
        self.config = config
        self.config_file = config_file
        # Keyed by grid name: a test grid and a development grid can share one local cluster.
        self.run_dir = config.root / "run" / "grid" / config.name
        self.log_dir = config.root / "logs"

    def services(self) -> list[Service]:
        base = [sys.executable, "-m", "dicomgrid"]
        if self.config_file:
            base += ["--config", str(Path(self.config_file).resolve())]

        def argv(slug: str, *command: str) -> list[str]:
            return [*base, "--log-file", str(self._log_file(slug)), *command]

        out = []
        for site in self.config.sites:
            pool = site.receiver_processes
            for i in range(1, pool + 1):
                command = ["serve", "receiver", "--site", site.name] + (["--reuse-port"] if pool > 1 else [])
                probe = DimseProbe(site.dicom_host, site.dicom_port, site.ae_title)
                out.append(Service(site.name, "receiver", i, argv(f"{site.name}-receiver-{i}", *command), probe))
            out.append(
                Service(
                    site.name, "http", 1, argv(f"{site.name}-http", "serve", "http", "--site", site.name),
                    f"http://{site.http_host}:{site.http_port}/health",
                )
            )
            out.append(Service(site.name, "processors", 1,
                               argv(f"{site.name}-processors", "serve", "processors", "--site", site.name), None))
            out.append(Service(site.name, "replicator", 1,
                               argv(f"{site.name}-replicator", "serve", "replicator", "--site", site.name), None))
        return out

    def _log_file(self, slug: str) -> Path:
        return self.log_dir / f"{self.config.name}-{slug}.log"

    def daemon(self, service: Service) -> Daemon:
        logs = self.config.logs
        return Daemon(
            service.name, self.run_dir / f"{service.slug}.pid",
            log_file=self._log_file(service.slug),
            out_file=self.log_dir / f"{self.config.name}-{service.slug}.out",
            out_max_bytes=logs.max_bytes, out_backups=logs.backups,
        )

    def status(self) -> list[ServiceStatus]:
        out = []
        for service in self.services():
            pid = self.daemon(service).pid()
            probe = service.probe
            if pid is None:
                out.append(ServiceStatus(service, None, False, False, "not running"))
                continue
            if probe is None:
                healthy, detail = True, "running"
            elif isinstance(probe, str):
                healthy = _http_ok(probe)
                detail = probe if healthy else f"{probe} not answering"
            else:
                failure = (
                    c_echo(probe, probe_calling_ae(self.config.security))
                    if _listening(pid, probe.port)
                    else "not listening"
                )
                healthy = failure is None
                detail = f"dicom://{probe.called_ae}@{probe.host}:{probe.port}" + (f" {failure}" if failure else "")
            out.append(ServiceStatus(service, pid, True, healthy, detail))
        return out

    def up(self, timeout: float = 60.0) -> list[ServiceStatus]:
        """Start every service that is not running; wait until all are healthy."""
        for service in self.services():
            daemon = self.daemon(service)
            if daemon.pid() is None:
                daemon.start(service.argv, cwd=Path.cwd())
        deadline = time.monotonic() + timeout
        while True:
            statuses = self.status()
            dead = [s for s in statuses if not s.running]
            if dead:
                names = ", ".join(s.service.name for s in dead)
                raise RuntimeError(f"service(s) exited during start-up: {names}\n{self.daemon(dead[0].service).excerpt()}")
            if all(s.healthy for s in statuses):
                return statuses
            if time.monotonic() > deadline:
                slow = ", ".join(f"{s.service.name} ({s.detail})" for s in statuses if not s.healthy)
                raise RuntimeError(f"services not healthy after {timeout:.0f}s: {slow}")
            time.sleep(0.3)

    def down(self, grace: float = 20.0) -> None:
        self.stop_pid_files(self.run_dir, grace)

    @staticmethod
    def stop_pid_files(run_dir: Path, grace: float = 20.0) -> None:
        """Stop every service with a pid file in ``run_dir`` (SIGTERM, SIGKILL after ``grace``)."""
        for pid_file in run_dir.glob("*.pid"):
            Daemon(pid_file.stem, pid_file, pid_file, pid_file).stop(grace)

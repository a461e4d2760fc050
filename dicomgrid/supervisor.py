"""Runs the grid's site services as detached processes and restarts the ones that exit: receivers, HTTP,
stream processors, replication.

Each service is one ``python -m dicomgrid serve ...`` process with a pid file under
``<data_dir>/run/grid/<grid name>/`` and, under ``<data_dir>/logs/``, a log it writes itself (``.log``,
rotated) and its console output (``.out``), so ``dicomgrid up`` is idempotent (running services are kept)
and ``dicomgrid down`` works from any shell.

A supervisor loop (:meth:`Supervisor.supervise`) starts what is not running and restarts a service whose
process is gone, after a delay that doubles with each exit up to a cap and is forgotten once the
service has stayed up a while. It runs in ``dicomgrid up`` itself, or, for ``dicomgrid up --detach``, in
a ``dicomgrid supervise`` process of its own; either way ``run/.../supervisor.pid`` names it, so there is
one per grid, and ``dicomgrid down`` stops it before the services. Restart counts are kept in
``restarts.json`` beside the pid files, where ``dicomgrid status`` reads them.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import psutil
import tenacity
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicomgrid.core import metrics
from dicomgrid.core.config import GridConfig, SecurityConfig, SiteConfig
from dicomgrid.core.daemon import Daemon
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

PROBE_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.3
SUPERVISOR = "supervisor"
RESTARTS_FILE = "restarts.json"


@dataclass(frozen=True)
class DimseProbe:
    """A site AE to probe with C-ECHO: on its TLS port when it has one (the probe then checks the
    certificate too), else on its plain port; every port it has must be listening."""

    host: str
    port: int | None  # the plain port, None when tls.plain_dicom is off
    called_ae: str
    tls_port: int | None = None  # None when tls.dicom is off


Probe = DimseProbe | str | None  # C-ECHO, HTTP URL, or None (process liveness only)


@dataclass(frozen=True)
class ServiceKind:
    """One kind of per-site service: the ``dicomgrid serve`` command that runs it, how many processes
    a site runs of it, and how its health is probed. :data:`SERVICE_KINDS` lists them all."""

    kind: str
    processes: Callable[[SiteConfig, GridConfig], int]
    arguments: Callable[[SiteConfig], list[str]]  # after ``dicomgrid serve <kind>``
    probe: Callable[[SiteConfig], Probe]
    numbered: bool = False  # names carry the process number ("A/receiver-1"), for pools


SERVICE_KINDS: tuple[ServiceKind, ...] = (
    ServiceKind(
        "receiver",
        lambda site, grid: site.receiver_processes,
        lambda site: ["--site", site.name] + (["--reuse-port"] if site.receiver_processes > 1 else []),
        lambda site: DimseProbe(site.dicom_host, site.dicom_port, site.ae_title, site.dicom_tls_port),
        numbered=True,
    ),
    ServiceKind(
        "http",
        lambda site, grid: 1,
        lambda site: ["--site", site.name],
        lambda site: f"http://{site.http_host}:{site.http_port}/health/live",
    ),
    ServiceKind("processors", lambda site, grid: 1, lambda site: ["--site", site.name], lambda site: None),
    ServiceKind("replicator", lambda site, grid: 1, lambda site: ["--site", site.name], lambda site: None),
    # The Parquet sink runs at the sites analytics.sites names (every site when unset).
    ServiceKind("sink", lambda site, grid: int(grid.analytics.sites is None or site.name in grid.analytics.sites),
                lambda site: ["--site", site.name], lambda site: None),
)


@dataclass(frozen=True)
class Service:
    site: str
    kind: str
    index: int
    argv: list[str]  # after ``python -m dicomgrid [--config FILE] --log-file FILE``
    probe: Probe
    numbered: bool = False

    @property
    def name(self) -> str:
        return f"{self.site}/{self.kind}" + (f"-{self.index}" if self.numbered else "")

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
    restarts: int = 0


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


def c_echo(probe: DimseProbe, calling_ae: str, timeout: float = PROBE_TIMEOUT_S,
           tls: ssl.SSLContext | None = None) -> str | None:
    """C-ECHO the AE (with ``tls`` on its TLS port); None on success, else why it failed. The association
    is released, not left open."""
    ae = _ProbeAE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    port = probe.tls_port if tls is not None else probe.port
    assert port is not None
    _QUIET.probing.active = True
    try:
        assoc = ae.associate(probe.host, port, ae_title=probe.called_ae,
                             tls_args=(tls, probe.host) if tls is not None else None)
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


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    """GET ``url`` answers 200 (plain http.client: no proxy settings apply, nothing is logged)."""
    parts = urllib.parse.urlsplit(url)
    connection: http.client.HTTPConnection = (
        http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=1.0, context=context)
        if parts.scheme == "https" else http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=1.0)
    )
    try:
        connection.request("GET", parts.path or "/")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


@dataclass
class _Watch:
    """What the supervisor loop knows of one service."""

    service: Service
    process: subprocess.Popen[bytes] | None = None  # when this supervisor started it (exit code known)
    started_at: float | None = None  # time.monotonic() of the start this loop saw or made
    failures: int = 0  # exits since it was last stable: sets the restart delay
    restart_at: float | None = None  # set once its exit was seen
    held: bool = False  # stopped on request (stop_service); started again, not restarted, once released


@dataclass
class _Record:
    restarts: int = 0
    exits: int = 0
    last_exit_code: int | None = None
    last_exit_at: str | None = None


class Supervisor:
    def __init__(self, config: GridConfig, config_file: str | None = None) -> None:
        self.config = config
        self.config_file = config_file
        # Keyed by grid name: a test grid and a development grid can share one local cluster.
        self.run_dir = config.root / "run" / "grid" / config.name
        self.log_dir = config.root / "logs"
        settings = config.supervisor
        self._backoff = tenacity.wait_exponential(multiplier=settings.restart_delay_s, max=settings.restart_delay_max_s)

    # -- what runs -------------------------------------------------------------------------------

    def _base_argv(self, log_file: Path) -> list[str]:
        argv = [sys.executable, "-m", "dicomgrid"]
        if self.config_file:
            argv += ["--config", str(Path(self.config_file).resolve())]
        return argv + ["--log-file", str(log_file)]

    def services(self) -> list[Service]:
        out = []
        for site in self.config.sites:
            for kind in SERVICE_KINDS:
                for i in range(1, kind.processes(site, self.config) + 1):
                    out.append(Service(site.name, kind.kind, i, ["serve", kind.kind, *kind.arguments(site)],
                                       self._probe(site, kind.probe(site)), kind.numbered))
        return out

    def _probe(self, site: SiteConfig, probe: Probe) -> Probe:
        """A probe as this grid's TLS settings say: the ports that listen, the HTTP scheme."""
        if isinstance(probe, DimseProbe):
            tls = self.config.tls
            return DimseProbe(probe.host, probe.port if tls.plain_dicom else None, probe.called_ae,
                              probe.tls_port if tls.dicom else None)
        if isinstance(probe, str) and self.config.tls.http:
            return probe.replace("http://", "https://", 1)
        return probe

    def _tls_probe(self, site: str) -> tuple[ssl.SSLContext, str]:
        """The context and calling AE of a TLS C-ECHO probe: as the site itself, with its certificate,
        when its AE title may call (so it passes required client certificates too); else anonymous."""
        from dicomgrid.core.tls import client_context

        me = self.config.site(site)
        if self.config.is_calling_ae_allowed(me.ae_title):
            return client_context(self.config, site), me.ae_title
        return client_context(self.config), probe_calling_ae(self.config.security)

    def _dimse_health(self, service: Service, probe: DimseProbe, pid: int) -> tuple[bool, str]:
        ports = [p for p in (probe.port, probe.tls_port) if p is not None]
        detail = f"dicom://{probe.called_ae}@{probe.host}:" + "+".join(str(p) for p in ports)
        silent = [p for p in ports if not _listening(pid, p)]
        if silent:
            return False, f"{detail} not listening on {', '.join(map(str, silent))}"
        try:
            if probe.tls_port is not None:
                context, calling_ae = self._tls_probe(service.site)
                failure = c_echo(probe, calling_ae, tls=context)
            else:
                failure = c_echo(probe, probe_calling_ae(self.config.security))
        except (OSError, ssl.SSLError, RuntimeError) as exc:  # certificates that cannot be loaded
            failure = f"TLS probe cannot start: {exc}"
        return failure is None, detail + (f" {failure}" if failure else "")

    def _daemon(self, slug: str, name: str) -> Daemon:
        logs = self.config.logs
        return Daemon(
            name, self.run_dir / f"{slug}.pid",
            log_file=self.log_dir / f"{self.config.name}-{slug}.log",
            out_file=self.log_dir / f"{self.config.name}-{slug}.out",
            out_max_bytes=logs.max_bytes, out_backups=logs.backups,
        )

    def daemon(self, service: Service) -> Daemon:
        return self._daemon(service.slug, service.name)

    def supervisor_daemon(self) -> Daemon:
        return self._daemon(SUPERVISOR, SUPERVISOR)

    def _hold_file(self, service: Service) -> Path:
        return self.run_dir / f"{service.slug}.held"

    def start_service(self, service: Service) -> subprocess.Popen[bytes]:
        """Start one service's process (detached, logging to its files); nothing restarts it but a
        running supervisor."""
        daemon = self.daemon(service)
        return daemon.start([*self._base_argv(daemon.log_file), *service.argv], cwd=Path.cwd())

    # -- status ----------------------------------------------------------------------------------

    def restarts(self) -> dict[str, _Record]:
        """What the supervisor recorded of each service's exits and restarts."""
        try:
            data = json.loads((self.run_dir / RESTARTS_FILE).read_text())
            return {name: _Record(**record) for name, record in data.items()}
        except (FileNotFoundError, ValueError, TypeError):
            return {}

    def status(self) -> list[ServiceStatus]:
        out = []
        records = self.restarts()
        for service in self.services():
            pid = self.daemon(service).pid()
            restarts = records.get(service.name, _Record()).restarts
            probe = service.probe
            if pid is None:
                held = self._hold_file(service).exists()
                out.append(ServiceStatus(service, None, False, False,
                                         "stopped on request until the next `up`" if held else "not running", restarts))
                continue
            if probe is None:
                healthy, detail = True, "running"
            elif isinstance(probe, str):
                healthy = _http_ok(probe, self._https_context())
                detail = probe if healthy else f"{probe} not answering"
            else:
                healthy, detail = self._dimse_health(service, probe, pid)
            out.append(ServiceStatus(service, pid, True, healthy, detail, restarts))
        return out

    def _https_context(self) -> ssl.SSLContext | None:
        if not self.config.tls.http:
            return None
        from dicomgrid.core.tls import client_context

        try:
            return client_context(self.config)
        except RuntimeError:
            return None  # no CA yet: the probe fails, and says so

    def supervisor_pid(self) -> int | None:
        return self.supervisor_daemon().pid()

    # -- up / down -------------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> list[ServiceStatus]:
        """Make sure a detached supervisor runs (it starts what is not running, including services
        stopped with :meth:`stop_service`); wait until all is healthy.

        When this starts the supervisor, a service that exits before all are healthy fails the call (a
        start-up crash); when one runs already, exits are its business (e.g. a service killed a moment
        ago and being restarted).
        """
        for hold in self.run_dir.glob("*.held"):
            hold.unlink(missing_ok=True)
        supervisor = self.supervisor_daemon()
        exits = None
        if supervisor.pid() is None:
            exits = self.exits()
            supervisor.start([*self._base_argv(supervisor.log_file), "supervise"], cwd=Path.cwd())
        return self.wait_healthy(timeout, exits)

    def stop_service(self, service: Service, grace: float = 20.0) -> None:
        """Stop one service and keep it stopped (the supervisor leaves it alone) until the next :meth:`up`."""
        hold = self._hold_file(service)
        hold.parent.mkdir(parents=True, exist_ok=True)
        hold.touch()  # before the stop, so the supervisor never takes it for an exit
        self.daemon(service).stop(grace)

    def wait_healthy(self, timeout: float = 60.0, exits: dict[str, int] | None = None) -> list[ServiceStatus]:
        """Wait until every service is healthy; fail if the supervisor is gone or, given the ``exits``
        recorded before a start, if a service exited since (it will be restarted), with the end of the
        logs that say why."""
        deadline = time.monotonic() + timeout
        while True:
            if self.supervisor_pid() is None:
                raise RuntimeError(f"the supervisor is not running\n{self.supervisor_daemon().excerpt()}")
            records = self.restarts()
            crashed = [] if exits is None else [
                s for s in self.services() if records.get(s.name, _Record()).exits > exits.get(s.name, 0)]
            if crashed:
                names = ", ".join(s.name for s in crashed)
                raise RuntimeError(
                    f"service(s) exited during start-up (the supervisor keeps restarting them; "
                    f"`dicomgrid down` stops it): {names}\n{self.daemon(crashed[0]).excerpt()}"
                )
            statuses = self.status()
            if all(s.healthy for s in statuses):
                return statuses
            if time.monotonic() > deadline:
                slow = ", ".join(f"{s.service.name} ({s.detail})" for s in statuses if not s.healthy)
                raise RuntimeError(f"services not healthy after {timeout:.0f}s: {slow}")
            time.sleep(POLL_INTERVAL_S)

    def exits(self) -> dict[str, int]:
        """Exits recorded so far, by service (what :meth:`wait_healthy` compares with, after a start)."""
        return {name: record.exits for name, record in self.restarts().items()}

    def take_over(self) -> None:
        """Become the grid's supervisor in this process (``dicomgrid up`` in the foreground): a detached
        supervisor is stopped first, the services it started keep running."""
        supervisor = self.supervisor_daemon()
        if supervisor.pid() not in (None, os.getpid()):
            supervisor.stop(grace=10)
        supervisor.pid_file.parent.mkdir(parents=True, exist_ok=True)
        supervisor.pid_file.write_text(f"{os.getpid()}\n")

    def down(self, grace: float = 20.0) -> None:
        """Stop the supervisor (so nothing is restarted), then every service."""
        self.stop_pid_files(self.run_dir, grace)
        (self.run_dir / RESTARTS_FILE).unlink(missing_ok=True)
        for hold in self.run_dir.glob("*.held"):
            hold.unlink(missing_ok=True)

    @staticmethod
    def stop_pid_files(run_dir: Path, grace: float = 20.0) -> None:
        """Stop every process with a pid file in ``run_dir`` (SIGTERM, SIGKILL after ``grace``), the
        supervisor first. The calling process itself (a foreground supervisor) only drops its pid file."""
        pid_files = sorted(run_dir.glob("*.pid"), key=lambda p: p.stem != SUPERVISOR)
        for pid_file in pid_files:
            daemon = Daemon(pid_file.stem, pid_file, pid_file, pid_file)
            if daemon.pid() == os.getpid():
                pid_file.unlink(missing_ok=True)
            else:
                daemon.stop(grace)

    # -- the supervisor loop ---------------------------------------------------------------------

    def supervise(self, stop: threading.Event) -> None:
        """Start every service that is not running, then restart any that exits, until ``stop`` is set.

        Services are left running when the loop ends: ``down`` stops them.
        """
        settings = self.config.supervisor
        records = self.restarts()
        watches = [_Watch(service) for service in self.services()]
        for site in self.config.sites:
            if not any(self.daemon(w.service).pid() for w in watches if w.service.site == site.name):
                metrics.reset_multiprocess(metrics.metrics_dir(self.config.root, self.config.name, site.name))
        log.info("supervisor started", grid=self.config.name, services=len(watches), pid=os.getpid())
        for watch in watches:
            if self._hold_file(watch.service).exists():
                watch.held = True
            elif self.daemon(watch.service).pid() is None:
                watch.process = self.start_service(watch.service)
            watch.started_at = time.monotonic()
        while not stop.wait(POLL_INTERVAL_S):
            now = time.monotonic()
            changed = False
            for watch in watches:
                name = watch.service.name
                if self._hold_file(watch.service).exists():
                    watch.held, watch.restart_at = True, None
                    continue
                if self.daemon(watch.service).pid() is not None:
                    watch.held = False
                    if watch.failures and watch.started_at is not None and now - watch.started_at >= settings.stable_after_s:
                        watch.failures = 0
                    continue
                if watch.held:  # released by `up`: started, not restarted
                    watch.held = False
                    watch.process = self.start_service(watch.service)
                    watch.started_at = now
                    log.info("service started again", service=name, pid=watch.process.pid)
                    continue
                if watch.restart_at is None:
                    record = records.setdefault(name, _Record())
                    code = self._reap(watch)
                    watch.failures += 1
                    delay = self.restart_delay(watch.failures)
                    watch.restart_at = now + delay
                    record.exits += 1
                    record.last_exit_code = code
                    record.last_exit_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
                    changed = True
                    log.warning("service exited; restarting", service=name, exit_code=code,
                                restart_in_s=round(delay, 2), restarts=record.restarts)
                elif now >= watch.restart_at and not stop.is_set():
                    watch.process = self.start_service(watch.service)
                    watch.started_at, watch.restart_at = now, None
                    record = records.setdefault(name, _Record())
                    record.restarts += 1
                    changed = True
                    log.info("service restarted", service=name, pid=watch.process.pid, restarts=record.restarts)
            if changed:
                self._save(records)
        log.info("supervisor stopped", grid=self.config.name)

    def restart_delay(self, failures: int) -> float:
        """Seconds before restarting a service that exited ``failures`` times since it was last stable."""
        return self._backoff(SimpleNamespace(attempt_number=failures))

    @staticmethod
    def _reap(watch: _Watch) -> int | None:
        """The exit code of a service this supervisor started (reaping it), else None (not our child)."""
        if watch.process is None:
            return None
        try:
            return watch.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return None

    def _save(self, records: dict[str, _Record]) -> None:
        path = self.run_dir / RESTARTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({name: vars(record) for name, record in records.items()}, indent=1))
        os.replace(tmp, path)

"""Runs the grid's site services as detached processes: receivers, HTTP, stream processors.

Each service is one ``python -m dicomgrid serve ...`` process with a pid file under
``<data_dir>/run/grid/<grid name>/`` and a log under ``<data_dir>/logs/``, so ``dicomgrid up`` is idempotent
(running services are kept) and ``dicomgrid down`` works from any shell.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from dicomgrid.core.config import GridConfig
from dicomgrid.core.daemon import Daemon


@dataclass(frozen=True)
class Service:
    site: str
    kind: str  # receiver | http | processors
    index: int
    argv: list[str]
    probe: tuple[str, int] | str | None  # TCP address, HTTP URL, or None (process liveness only)

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


def _tcp_open(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


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
        out = []
        for site in self.config.sites:
            pool = site.receiver_processes
            for i in range(1, pool + 1):
                argv = [*base, "serve", "receiver", "--site", site.name] + (["--reuse-port"] if pool > 1 else [])
                out.append(Service(site.name, "receiver", i, argv, (site.dicom_host, site.dicom_port)))
            out.append(
                Service(
                    site.name, "http", 1, [*base, "serve", "http", "--site", site.name],
                    f"http://{site.http_host}:{site.http_port}/health",
                )
            )
            out.append(Service(site.name, "processors", 1, [*base, "serve", "processors", "--site", site.name], None))
        return out

    def daemon(self, service: Service) -> Daemon:
        log = self.log_dir / f"{self.config.name}-{service.slug}.log"
        return Daemon(service.name, self.run_dir / f"{service.slug}.pid", log, log)

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
                healthy = _tcp_open(probe)
                detail = f"dicom://{probe[0]}:{probe[1]}" + ("" if healthy else " not accepting")
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

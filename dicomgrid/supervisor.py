"""Runs the grid's site services as detached processes: receivers, HTTP, stream processors.

Each service is one ``python -m dicomgrid serve ...`` process with a pid file under
``<data_dir>/run/grid/<grid name>/`` and a log under ``<data_dir>/logs/``, so ``dicomgrid up`` is idempotent
(running services are kept) and ``dicomgrid down`` works from any shell.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from dicomgrid.core.config import GridConfig


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


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

    def _pid_file(self, service: Service) -> Path:
        return self.run_dir / f"{service.slug}.pid"

    def _log_file(self, service: Service) -> Path:
        return self.log_dir / f"{self.config.name}-{service.slug}.log"

    def _pid(self, service: Service) -> int | None:
        try:
            pid = int(self._pid_file(service).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def status(self) -> list[ServiceStatus]:
        out = []
        for service in self.services():
            pid = self._pid(service)
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in self.services():
            if self._pid(service) is not None:
                continue
            log = self._log_file(service).open("ab")
            proc = subprocess.Popen(
                service.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
            self._pid_file(service).write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while True:
            statuses = self.status()
            dead = [s for s in statuses if not s.running]
            if dead:
                names = ", ".join(s.service.name for s in dead)
                tail = self.log_tail(dead[0].service)
                raise RuntimeError(f"service(s) exited during start-up: {names}\n--- {self._log_file(dead[0].service)}\n{tail}")
            if all(s.healthy for s in statuses):
                return statuses
            if time.monotonic() > deadline:
                slow = ", ".join(f"{s.service.name} ({s.detail})" for s in statuses if not s.healthy)
                raise RuntimeError(f"services not healthy after {timeout:.0f}s: {slow}")
            time.sleep(0.3)

    def down(self, timeout: float = 20.0) -> None:
        self.stop_pid_files(self.run_dir, timeout)

    @staticmethod
    def stop_pid_files(run_dir: Path, timeout: float = 20.0) -> None:
        """Stop every service with a pid file in ``run_dir``: SIGTERM, then SIGKILL after ``timeout``."""
        pid_files = list(run_dir.glob("*.pid"))
        pids = []
        for pid_file in pid_files:
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if _alive(pid):
                os.killpg(pid, signal.SIGTERM)
                pids.append(pid)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        for pid_file in pid_files:
            pid_file.unlink(missing_ok=True)

    def log_tail(self, service: Service, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_file(service).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

"""The reference receivers: DCMTK storescp (close to the physical limit) and Orthanc (an archive).

Every target is started by the harness on free loopback ports, with its own storage under
``.dicomgrid/bench/tmp``, and stopped (storage removed) at the end; an Orthanc given a directory of its
own keeps it (the cached metadata-scale set, :mod:`bench.scale_archives`). The grid is in
:mod:`bench.grid`.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import psutil
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from bench.corpus import RunCorpus
from bench.paths import LOGS, scratch_dir
from bench.retired import retire
from bench.storescu import SendResult, dcmtk_env
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool

# The largest receive PDU both DCMTK's storescp and Orthanc accept (the grid's own is 256 KiB).
MAX_PDU = 131072
ORTHANC = "/usr/sbin/Orthanc"
# Debian's orthanc-dicomweb package (WADO-RS, QIDO-RS, STOW-RS under DICOMWEB_ROOT).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_ROOT = "/dicom-web/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None, log: Path, timeout: float = 30.0) -> None:
    """Wait until something accepts on 127.0.0.1:``port``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} during start-up; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:.0f}s; see {log}")


@dataclass(frozen=True)
class RunCheck:
    """What a target holds after a run: instances stored, and for the grid how long after the last
    response its last instances became visible in the index (``instances``) and as locations."""

    stored: int | None
    index_lag_s: float | None = None
    location_lag_s: float | None = None
    note: str = ""
    # Two-site grid: from the last response until the other site holds a verified copy of every instance.
    replication_lag_s: float | None = None


class Target(Protocol):
    key: str  # stable id in results: "storescp", "orthanc", "grid", "grid-2rx"
    label: str  # as shown in tables
    ae_title: str
    port: int
    primary: str  # the process group whose peak RSS is the target's own

    def start(self) -> None: ...

    def activate(self) -> None:
        """Make this target the one that answers on its port (the grid variants share one port)."""
        ...

    def stop(self) -> None: ...

    def groups(self) -> dict[str, list[psutil.Process]]:
        """Process groups to sample during a run, the primary one first."""
        ...

    def before_run(self) -> None: ...

    def after_run(self, corpus: RunCorpus, sent: SendResult) -> RunCheck: ...

    def describe(self) -> dict[str, object]:
        """Version and settings, for the results."""
        ...


class _Process:
    """One child process of the harness with its log file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log = LOGS / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: list[str], cwd: Path | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dcmtk_env(), cwd=cwd)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def processes(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.proc.pid)] if self.proc is not None else []
        except psutil.Error:
            return []


def dcmtk_version() -> str:
    """The DCMTK version ("3.6.7") that storescp reports."""
    out = subprocess.run([require_dcmtk_tool("storescp"), "--version"], capture_output=True, text=True)
    match = re.search(r"v(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    return match.group(1) if match else "?"


class _ReferenceTarget:
    """What storescp and Orthanc share: one process of ours and a scratch directory removed on stop."""

    primary: str
    _process: _Process
    _dir: Path | None
    _keep_dir: bool = False

    def activate(self) -> None:
        pass

    def stop(self) -> None:
        self._process.stop()
        if self._dir is not None and not self._keep_dir:
            retire(self._dir)

    def groups(self) -> dict[str, list[psutil.Process]]:
        return {self.primary: self._process.processes()}


class StoreSCP(_ReferenceTarget):
    """DCMTK storescp writing every data set bit-preserved to a directory, one process per association.

    It does no fsync and keeps no index: the ceiling a durable archive can approach, not a peer.
    """

    key, label, ae_title, primary = "storescp", "DCMTK storescp", "STORESCP", "storescp"

    def __init__(self) -> None:
        self.port = free_port()
        self._process = _Process("storescp")
        self._dir: Path | None = None
        self.argv: list[str] = []

    @property
    def _out(self) -> Path:
        assert self._dir is not None
        return self._dir / "received"

    def start(self) -> None:
        self._dir = scratch_dir("storescp-")
        self._out.mkdir()
        self.argv = [
            require_dcmtk_tool("storescp"), "--fork", "--disable-host-lookup", "--bit-preserving",
            "--max-pdu", str(MAX_PDU), "--aetitle", self.ae_title, "--output-directory", str(self._out), str(self.port),
        ]
        self._process.start(self.argv)
        wait_listening(self.port, self._process.proc, self._process.log)


    def before_run(self) -> None:
        # Files of the previous run would be overwritten in place otherwise.
        retire(self._out)
        self._out.mkdir()

    def after_run(self, corpus: RunCorpus, sent: SendResult) -> RunCheck:
        return RunCheck(sum(1 for _ in self._out.iterdir()))

    def describe(self) -> dict[str, object]:
        # The tool's name, not its path: results stay comparable across machines.
        return {"version": dcmtk_version(), "argv": " ".join([Path(self.argv[0]).name, *self.argv[1:-1]])}


class Orthanc(_ReferenceTarget):
    """Debian's Orthanc with its default SQLite index and file storage, fsync on (SyncStorageArea), and
    Debian's DICOMweb plugin loaded (WADO-RS for the retrieve section).

    ``directory`` makes its storage and index persistent (kept on stop, reused on the next start);
    ``overrides`` change settings of that instance only.
    """

    key, label, ae_title, primary = "orthanc", "Orthanc", "ORTHANC", "orthanc"

    def __init__(self, name: str = "orthanc", directory: Path | None = None, **overrides: object) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self._process = _Process(name)
        self._dir: Path | None = directory
        self._keep_dir = directory is not None
        self._overrides = overrides
        self._before = 0
        self.settings: dict[str, object] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + DICOMWEB_ROOT.rstrip("/")

    def start(self) -> None:
        if self._dir is None:
            self._dir = scratch_dir("orthanc-")
        self._dir.mkdir(parents=True, exist_ok=True)
        if not DICOMWEB_PLUGIN.exists():
            raise RuntimeError(f"{DICOMWEB_PLUGIN} is missing: install Debian's orthanc-dicomweb package")
        self.settings = {
            "Name": "dicomgrid-bench",
            "StorageDirectory": str(self._dir / "storage"),
            "IndexDirectory": str(self._dir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "SyncStorageArea": True,
            "StorageCompression": False,
            "MaximumPduLength": MAX_PDU,
            "DicomThreadsCount": 4,
            "SaveJobs": False,
            **self._overrides,
        }
        config = self._dir / "orthanc.json"
        config.write_text(json.dumps(self.settings, indent=2))
        self._process.start([ORTHANC, str(config)], cwd=self._dir)
        wait_listening(self.port, self._process.proc, self._process.log)
        wait_listening(self.http_port, self._process.proc, self._process.log)
        self._check_dicomweb()

    @retry(retry=retry_if_exception_type(httpx.TransportError), stop=stop_after_delay(20), wait=wait_fixed(0.5),
           reraise=True)
    def _check_dicomweb(self) -> None:
        """The plugin loads silently or not at all: ask Orthanc which plugins it runs.

        Asked again for a while if the connection fails: Orthanc listens on its HTTP port a moment
        before it serves it, and a request in that moment is reset.
        """
        plugins = httpx.get(f"{self.url}/plugins", timeout=30).json()
        if "dicom-web" not in plugins:
            raise RuntimeError(f"Orthanc did not load {DICOMWEB_PLUGIN} (plugins: {plugins}); see {self._process.log}")

    def _count(self) -> int:
        return int(self.statistics()["CountInstances"])

    def statistics(self) -> dict[str, object]:
        return httpx.get(f"{self.url}/statistics", timeout=60).json()

    def before_run(self) -> None:
        self._before = self._count()

    def after_run(self, corpus: RunCorpus, sent: SendResult) -> RunCheck:
        return RunCheck(self._count() - self._before)

    def describe(self) -> dict[str, object]:
        version = httpx.get(f"{self.url}/system", timeout=10).json().get("Version", "?")
        plugins = {p: httpx.get(f"{self.url}/plugins/{p}", timeout=10).json().get("Version", "?")
                   for p in httpx.get(f"{self.url}/plugins", timeout=10).json() if not p.endswith(".js")}
        shown = {k: v for k, v in self.settings.items() if not k.endswith(("Directory", "Port"))}
        return {"version": version, "plugins": plugins, "settings": shown}

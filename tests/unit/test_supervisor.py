"""The supervisor's health probes: C-ECHO for the site AE, GET /health for the HTTP service."""

from __future__ import annotations

import http.server
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomgrid.core.config import GridConfig, SecurityConfig, SiteConfig
from dicomgrid.supervisor import DimseProbe, Supervisor, c_echo, probe_calling_ae
from tests.grid import free_port

CALLED_AE = "GRID_T"


@pytest.fixture
def scp() -> Iterator[tuple[DimseProbe, object]]:
    """A Verification SCP that, like a site AE, admits only allowed calling AE titles."""
    ae = AE(ae_title=CALLED_AE)
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    ae.require_calling_aet = ["ECHOSCU"]
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield DimseProbe("127.0.0.1", port, CALLED_AE), server
    server.shutdown()


def probe_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= logging.WARNING]


def test_c_echo_succeeds_and_leaves_no_association_behind(scp, caplog):
    probe, server = scp
    for _ in range(5):
        assert c_echo(probe, "ECHOSCU") is None
    deadline = time.monotonic() + 5
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.active_associations == []
    assert probe_errors(caplog) == []


def test_c_echo_failures_are_reported_not_logged(scp, caplog):
    probe, _ = scp
    assert "rejected" in c_echo(probe, "INTRUDER")
    assert "rejected" in c_echo(DimseProbe(probe.host, probe.port, "OTHER_AE"), "ECHOSCU")
    assert "no association" in c_echo(DimseProbe("127.0.0.1", free_port(), CALLED_AE), "ECHOSCU", timeout=1.0)
    assert probe_errors(caplog) == []


def test_probe_calls_with_an_allowed_title():
    assert probe_calling_ae(SecurityConfig(allowed_calling_aes=["STORESCU", "ECHOSCU"])) == "ECHOSCU"
    assert probe_calling_ae(SecurityConfig(allowed_calling_aes=["PACS1", "PACS2"])) == "PACS1"
    assert probe_calling_ae(SecurityConfig(allow_any_calling_ae=True)) == "ECHOSCU"


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health/live" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_status_echoes_each_receiver_and_gets_health(scp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    probe, _ = scp
    monkeypatch.setenv("DICOMGRID_DATA_DIR", str(tmp_path))
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    site = SiteConfig(
        name="A", ae_title=CALLED_AE, dicom_port=probe.port, http_port=http_server.server_port,
        storage_root=tmp_path / "blobs", cassandra_dc="dc1", receiver_processes=2,
    )
    config = GridConfig(name="probe-test", sites=[site], security=SecurityConfig(allowed_calling_aes=["ECHOSCU"]))
    supervisor = Supervisor(config)
    # Receiver 1 and the HTTP service are this process (it serves both); receiver 2 is a process that
    # runs but never listens: the port answering C-ECHO does not make it healthy.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.05)
        pids = {"A/receiver-1": os.getpid(), "A/receiver-2": sleeper.pid, "A/http": os.getpid()}
        for service in supervisor.services():
            if service.name in pids:
                supervisor.daemon(service).pid_file.parent.mkdir(parents=True, exist_ok=True)
                supervisor.daemon(service).pid_file.write_text(f"{pids[service.name]}\n")
        status = {s.service.name: s for s in supervisor.status()}
        assert status["A/receiver-1"].healthy, status["A/receiver-1"].detail
        assert not status["A/receiver-2"].healthy and "not listening" in status["A/receiver-2"].detail
        assert status["A/http"].healthy, status["A/http"].detail
        assert not status["A/processors"].running
    finally:
        sleeper.kill()
        sleeper.wait()
        http_server.shutdown()


def test_services_come_from_the_service_kinds_and_log_to_their_own_files(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DICOMGRID_DATA_DIR", str(tmp_path))
    site = SiteConfig(name="A", ae_title="GRID_A", dicom_port=1, http_port=2, storage_root=tmp_path / "b",
                      cassandra_dc="dc1", receiver_processes=2)
    supervisor = Supervisor(GridConfig(name="kinds", sites=[site]))
    services = supervisor.services()
    assert [s.name for s in services] == ["A/receiver-1", "A/receiver-2", "A/http", "A/processors", "A/replicator",
                                          "A/sink"]
    assert services[0].argv == ["serve", "receiver", "--site", "A", "--reuse-port"]
    # The Parquet sink runs only where analytics.sites says, when it says anything.
    elsewhere = GridConfig(name="kinds", sites=[site], analytics={"sites": []})
    assert "A/sink" not in [s.name for s in Supervisor(elsewhere).services()]
    daemon = supervisor.daemon(services[2])
    assert (daemon.log_file.name, daemon.out_file.name) == ("kinds-A-http.log", "kinds-A-http.out")


def test_restart_delay_doubles_up_to_the_cap():
    supervisor = Supervisor(GridConfig(name="backoff", sites=[]))
    delays = [supervisor.restart_delay(n) for n in range(1, 10)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]

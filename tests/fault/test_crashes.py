"""Processes killed mid-stream: senders and services.

Nothing they were sending is left in a site's spool, and no service log loses what it said before.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.dicom_samples import make_instance, to_part10
from tests.grid import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.fault]

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def write_big_instance(path: Path, pixel_bytes: int = 96 * 2**20) -> None:
    """A Part 10 CT file with ``pixel_bytes`` of pixel data, written without holding it in memory."""
    ds = make_instance()
    del ds.PixelData
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = pixel_bytes // (1024 * 1024 * 2)
    with path.open("wb") as fh:
        fh.write(to_part10(ds))
        fh.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
        block = bytes(range(256)) * 4096
        for _ in range(pixel_bytes // len(block)):
            fh.write(block)


def spool_files(incoming: Path) -> list[Path]:
    return [p for p in incoming.rglob("*") if p.is_file()]


def start_storescu(site, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aec", site.ae_title, site.dicom_host, str(site.dicom_port), str(path)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def wait_spooling(incoming: Path, min_bytes: int = 8 * 2**20) -> Path:
    """The spool file of the transfer under way, once it holds ``min_bytes``."""
    return wait_for(lambda: next((p for p in spool_files(incoming) if p.stat().st_size >= min_bytes), None),
                    timeout=60, interval=0.05)


def service_status(grid, name: str):
    return next(s for s in grid.supervisor.status() if s.service.name == name)


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.dcm"
    write_big_instance(path)
    return path


def test_a_sender_killed_mid_transfer_leaves_nothing_in_the_spool(grid, big_file):
    site = grid.site("A")
    incoming = grid.config.site_storage("A") / "incoming"
    sender = start_storescu(site, big_file)
    try:
        partial = wait_spooling(incoming)
        size = partial.stat().st_size
    finally:
        sender.send_signal(signal.SIGKILL)
        sender.wait()
    killed = time.monotonic()
    wait_for(lambda: not spool_files(incoming), timeout=10, interval=0.05)
    print(f"partial spool file (at least {size} bytes) gone {time.monotonic() - killed:.2f}s after the sender "
          f"was killed")
    assert not partial.exists()


def test_a_stow_rs_client_gone_mid_body_leaves_nothing_open_or_on_disk(grid):
    site = grid.site("B")
    incoming = grid.config.site_storage("B") / "incoming"
    http_pid = service_status(grid, "B/http").pid

    def spooled() -> list[str]:
        """The HTTP service's open spool files (unnamed: "incoming/#inode (deleted)")."""
        targets = []
        for fd in Path(f"/proc/{http_pid}/fd").iterdir():
            try:
                targets.append(os.readlink(fd))
            except FileNotFoundError:
                pass
        return [t for t in targets if t.startswith(str(incoming))]

    part = to_part10(make_instance(pixel_bytes=64))
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Length: {50 * 2**20}\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=B\r\n\r\n'
            "--B\r\nContent-Type: application/dicom\r\n\r\n").encode()
    with socket.create_connection((site.http_host, site.http_port)) as sock:
        sock.sendall(head + part + b"\x00" * (4 * 2**20))  # then the client goes away mid-part
        wait_for(lambda: spooled(), timeout=10, interval=0.05)
    wait_for(lambda: not spooled(), timeout=10, interval=0.05)
    assert not spool_files(incoming)


def test_a_service_restarted_after_kill_9_appends_to_its_log(grid):
    before = service_status(grid, "A/http")
    log_file = grid.supervisor.daemon(before.service).log_file
    logged = wait_for(log_file.read_bytes, timeout=30)
    starts = logged.count(b'"event": "Uvicorn running on')
    os.kill(before.pid, signal.SIGKILL)
    wait_for(lambda: not service_status(grid, "A/http").running, timeout=10, interval=0.1)
    grid.supervisor.up(timeout=60)
    text = log_file.read_bytes()
    assert text.startswith(logged), "the log of the killed run is kept"
    assert text.count(b'"event": "Uvicorn running on') == starts + 1

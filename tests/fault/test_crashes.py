"""Processes killed mid-stream: senders, receivers and stream processors.

Nothing is left of a transfer a sender or receiver abandoned, the supervisor restarts what died (and says so in ``status``),
every acknowledged instance gets indexed within seconds, and no service log loses what it said before.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomgrid import schemas
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool
from tests.dicom_samples import make_instance, to_part10
from tests.grid import bearer, wait_for

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


def partial_files(store: Path) -> list[Path]:
    """What a site holds of data sets still arriving: pynetdicom's receive spool (``incoming/``) and the
    storage path's partial payloads (``tmp/*.part``)."""
    return [p for p in (store / "incoming").rglob("*") if p.is_file()] + list((store / "tmp").glob("*.part"))


def start_storescu(site, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [require_dcmtk_tool("storescu"), "-aec", site.ae_title, site.dicom_host, str(site.dicom_port), str(path)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def wait_receiving(store: Path, min_bytes: int = 8 * 2**20) -> Path:
    """The partial file of the transfer under way, once it holds ``min_bytes``."""
    def found() -> Path | None:
        for path in partial_files(store):
            try:
                if path.stat().st_size >= min_bytes:
                    return path
            except FileNotFoundError:
                pass
        return None
    return wait_for(found, timeout=60, interval=0.05)


def service_status(grid, name: str):
    return next(s for s in grid.supervisor.status() if s.service.name == name)


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.dcm"
    write_big_instance(path)
    return path


def test_a_sender_killed_mid_transfer_leaves_no_partial_data(grid, big_file):
    site = grid.site("A")
    store = grid.config.site_storage("A")
    sender = start_storescu(site, big_file)
    try:
        partial = wait_receiving(store)
        size = partial.stat().st_size
    finally:
        sender.send_signal(signal.SIGKILL)
        sender.wait()
    killed = time.monotonic()
    wait_for(lambda: not partial_files(store), timeout=10, interval=0.05)
    print(f"partial file (at least {size} bytes) gone {time.monotonic() - killed:.2f}s after the sender "
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
    token = bearer(grid.config)["Authorization"]
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
            f"Content-Length: {50 * 2**20}\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=B\r\n\r\n'
            "--B\r\nContent-Type: application/dicom\r\n\r\n").encode()
    with socket.create_connection((site.http_host, site.http_port)) as sock:
        sock.sendall(head + part + b"\x00" * (4 * 2**20))  # then the client goes away mid-part
        wait_for(lambda: spooled(), timeout=10, interval=0.05)
    wait_for(lambda: not spooled(), timeout=10, interval=0.05)
    assert not partial_files(grid.config.site_storage("B"))


def test_a_receiver_killed_mid_transfer_is_restarted_and_its_partial_data_removed(grid, big_file):
    site = grid.site("A")
    store = grid.config.site_storage("A")
    before = service_status(grid, "A/receiver-1")
    sender = start_storescu(site, big_file)
    try:
        wait_receiving(store)
        os.kill(before.pid, signal.SIGKILL)
        killed = time.monotonic()
        sender.wait(timeout=30)
    finally:
        sender.kill()
        sender.wait()
    after = wait_for(lambda: (s := service_status(grid, "A/receiver-1")).healthy and s.pid != before.pid and s,
                     timeout=60, interval=0.2)
    up_s = time.monotonic() - killed
    wait_for(lambda: not partial_files(store), timeout=10, interval=0.1)
    print(f"receiver back {up_s:.1f}s after kill -9, what it held of the transfer removed")
    assert after.restarts == before.restarts + 1


def test_stores_a_killed_receiver_acknowledged_are_audited_by_the_next_one(grid, taps):
    """An association's stores are audited in one record when it ends; the receiver is killed before
    that, so the next receiver of the site publishes the records it held in the spool."""
    audit_tap = taps(schemas.TOPIC_AUDIT)
    site = grid.site("A")
    before = service_status(grid, "A/receiver-1")
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established
    sent = []
    try:
        for _ in range(3):
            ds = make_instance(patient_id="CRASH-AUDIT-1")
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            assert assoc.send_c_store(ds).Status == 0x0000
            sent.append(ds.SOPInstanceUID)
        os.kill(before.pid, signal.SIGKILL)
    finally:
        assoc.abort()
    wait_for(lambda: (s := service_status(grid, "A/receiver-1")).healthy and s.pid != before.pid, timeout=60,
             interval=0.2)

    def covered(seen: list[dict]) -> set[str]:
        return {o["id"] for r in seen if r["event"] == "DICOM Instances Transferred" and r["action"] == "C"
                and r["outcome"] == 0 and r["site"] == "A" and r["outcome_description"].startswith("DIMSE")
                for o in r["objects"] if o["type"] == "instance"}

    records = audit_tap.collect(lambda seen: set(sent) <= covered(seen), timeout=60)
    assert set(sent) <= covered(records)
    mine = [r for r in records if set(sent) & covered([r])]
    # Each instance's own held record, sent by the restarted receiver (the killed one sent nothing).
    assert sorted(r["outcome_description"].split(": ")[1].split()[0] for r in mine) == ["payload"] * 3
    for record in mine:
        schemas.validate_event(schemas.TOPIC_AUDIT, record)


def test_a_service_restarted_after_kill_9_appends_to_its_log(grid):
    before = service_status(grid, "A/http")
    log_file = grid.supervisor.daemon(before.service).log_file
    logged = wait_for(log_file.read_bytes, timeout=30)
    starts = logged.count(b'"event": "Uvicorn running on')
    os.kill(before.pid, signal.SIGKILL)
    after = wait_for(lambda: (s := service_status(grid, "A/http")).healthy and s.pid != before.pid and s,
                     timeout=60, interval=0.2)
    assert after.restarts == before.restarts + 1
    text = log_file.read_bytes()
    assert text.startswith(logged), "the log of the killed run is kept"
    assert text.count(b'"event": "Uvicorn running on') == starts + 1


def first_indexed_after(log_file: Path, after: float) -> float | None:
    """When (time.time()) a processors log first says it indexed something after ``after``."""
    for line in log_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "indexed":
            at = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
            if at > after:
                return at
    return None


def test_processors_killed_mid_stream_lose_nothing_and_indexing_resumes_in_seconds(grid, metadata_dc2):
    site = grid.site("A")
    # Events are keyed by study: many studies spread them over every partition, A's and B's.
    studies = [generate_uid() for _ in range(30)]
    datasets = [make_instance(study_uid=studies[i % len(studies)]) for i in range(150)]
    before = service_status(grid, "A/processors")
    log_file = grid.supervisor.daemon(before.service).log_file
    logged_before = wait_for(log_file.read_bytes, timeout=30)  # at least its start-up
    acknowledged: list[str] = []
    last_ack = {"at": 0.0}

    def send() -> None:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
        try:
            for ds in datasets:
                if assoc.send_c_store(ds).Status == 0x0000:
                    acknowledged.append(ds.SOPInstanceUID)
                    last_ack["at"] = time.monotonic()
                time.sleep(0.01)
        finally:
            assoc.release()

    sender = threading.Thread(target=send)
    sender.start()
    wait_for(lambda: len(acknowledged) >= 40, timeout=60, interval=0.05)
    os.kill(before.pid, signal.SIGKILL)
    killed, killed_wall = time.monotonic(), time.time()
    sender.join(timeout=120)
    assert len(acknowledged) == len(datasets)

    def indexed() -> bool:
        found = set()
        for study in studies:
            found.update(row.sop_instance_uid for row in metadata_dc2.instances_of_study(study))
        return found >= set(acknowledged)

    wait_for(indexed, timeout=90, interval=0.25)
    all_indexed = time.monotonic()
    restarted = wait_for(lambda: (s := service_status(grid, "A/processors")).running and s.pid != before.pid and s,
                         timeout=30)
    resumed = {name: first_indexed_after(grid.supervisor.daemon(service_status(grid, name).service).log_file,
                                         killed_wall) for name in ("A/processors", "B/processors")}
    print(f"all {len(acknowledged)} acknowledged instances indexed {all_indexed - killed:.1f}s after kill -9 of "
          f"A's processors ({all_indexed - last_ack['at']:.1f}s after the last acknowledgement); first batch "
          f"indexed after the kill by " + ", ".join(f"{n} at +{t - killed_wall:.1f}s" for n, t in resumed.items() if t))
    assert all_indexed - killed < 25, "indexing must resume within seconds, not after a 60 s session timeout"
    assert restarted.restarts == before.restarts + 1
    shown = subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(grid.config_file), "status"],
                           capture_output=True, text=True, timeout=60).stdout
    assert any(line.startswith("A/processors") and f"restarts={restarted.restarts}" in line
               for line in shown.splitlines()), shown
    # The log of the crashed run is still there: appended to, never truncated.
    assert log_file.read_bytes().startswith(logged_before)

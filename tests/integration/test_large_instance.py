"""A large multi-frame instance streams through the receiver with flat memory and arrives intact."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import psutil
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import MultiFrameGrayscaleWordSecondaryCaptureImageStorage as SOP_CLASS

from dicomgrid.core.blobstore import BlobStore
from tests.dicom_samples import make_instance, to_part10
from tests.integration.test_ingest_grid import events_for

pytestmark = [pytest.mark.cluster]

FRAME = 512 * 512 * 2
FRAMES = 512  # 256 MiB of pixel data
CHUNK = 8 * 1024 * 1024


def write_large_file(path: Path) -> tuple[str, int]:
    """A Part 10 file with 256 MiB of pixel data, written without holding it in memory."""
    ds = make_instance(sop_class=SOP_CLASS)
    del ds.PixelData
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, FRAMES
    header = to_part10(ds, ExplicitVRLittleEndian)
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        fh.write(header)
        element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, FRAME * FRAMES)
        fh.write(element)
        digest.update(element)
        block = bytes(range(256)) * (CHUNK // 256)
        for _ in range(FRAME * FRAMES // CHUNK):
            fh.write(block)
            digest.update(block)
    return ds.SOPInstanceUID, len(header)


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set size, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def receiver_pid(grid) -> int:
    status = next(s for s in grid.supervisor.status() if s.service.name == "A/receiver-1")
    return status.pid


def test_256_mib_instance_keeps_receiver_memory_flat(grid, taps, tmp_path, monkeypatch):
    path = tmp_path / "large.dcm"
    sop_uid, header_len = write_large_file(path)
    pid = receiver_pid(grid)
    before = peak_rss(pid)
    tap = taps()

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    site = grid.site("A")
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = [build_context(SOP_CLASS, ExplicitVRLittleEndian)]
    ae.dimse_timeout = ae.network_timeout = 300
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()

    growth = peak_rss(pid) - before
    print(f"receiver peak RSS grew by {growth / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.0f} MiB instance")
    assert growth < 64 * 2**20, "the receiver must stream large instances, not hold them in memory"

    (event,) = events_for(tap, [sop_uid], timeout=60)
    stored = BlobStore(grid.config.site_storage("A"), "A").path(event["payload"]["sha256"])
    assert event["payload"]["size"] == stored.stat().st_size
    # The data set bytes are the sent ones: compare the tails (pixel data) without loading either file.
    with path.open("rb") as sent, stored.open("rb") as kept:
        sent.seek(-CHUNK, 2)
        kept.seek(-CHUNK, 2)
        assert sent.read() == kept.read()
    assert psutil.Process(pid).is_running()

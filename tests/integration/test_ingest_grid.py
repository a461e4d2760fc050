"""Ingest end to end on the real cluster: C-STORE / STOW-RS -> blob store -> Kafka -> Cassandra."""

from __future__ import annotations

import copy
import io
import socket
import struct

import httpx
import psutil
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.dicomfile import split_file_meta
from tests.dicom_samples import make_instance, to_part10
from tests.grid import wait_for, web

pytestmark = [pytest.mark.cluster]


def associate(site, calling_ae: str = "STORESCU", contexts=None):
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = contexts or [build_context(CTImageStorage), build_context(Verification)]
    return ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)


def c_store(site, datasets, calling_ae: str = "STORESCU") -> list[int]:
    assoc = associate(site, calling_ae)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def events_for(tap, sop_uids, n=None, timeout=30.0):
    wanted = set(sop_uids)
    count = len(wanted) if n is None else n

    def matching(seen):
        return [e for e in seen if e["instance"]["sop_instance_uid"] in wanted]

    return matching(tap.collect(lambda seen: len(matching(seen)) >= count, timeout=timeout))


def receiver_threads(grid, site: str) -> int:
    """Threads of the site's receiver processes: one pair more per open association."""
    pids = [grid.supervisor.daemon(s).pid() for s in grid.supervisor.services() if s.kind == "receiver" and s.site == site]
    return sum(psutil.Process(pid).num_threads() for pid in pids if pid is not None)



def indexed_versions(store, sop_instance_uid: str) -> dict[str, int]:
    """Every payload the index holds for a UID, with the version the indexer gave it."""
    rows = store.db.execute("SELECT sha256, version FROM instance_versions WHERE sop_instance_uid = ?", (sop_instance_uid,))
    return {row.sha256: row.version for row in rows}

def test_c_echo(grid):
    assoc = associate(grid.site("A"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_c_store_is_durable_announced_and_indexed_in_both_dcs(grid, taps, metadata_dc1, metadata_dc2):
    tap = taps()
    study = generate_uid()
    datasets = [make_instance(study_uid=study, modality=m, patient_name="Ünïcødé^Test", SpecificCharacterSet="ISO_IR 192")
                for m in ("CT", "CT", "SR")]
    assert c_store(grid.site("A"), datasets) == [0, 0, 0]

    events = events_for(tap, [ds.SOPInstanceUID for ds in datasets])
    assert len(events) == 3
    blobs = BlobStore(grid.config.site_storage("A"), "A")
    for event in events:
        schemas.validate_event(schemas.TOPIC_INSTANCE_STORED, event)
        assert event["site"] == "A" and event["source"]["calling_ae"] == "STORESCU"
        assert event["patient"]["name"] == "Ünïcødé^Test"
        assert blobs.verify(event["payload"]["sha256"])

    def indexed(store):
        row = store.study(study)
        return row if row is not None and row.number_of_instances == 3 else None

    for store in (metadata_dc1, metadata_dc2):
        row = wait_for(lambda: indexed(store), timeout=30)
        assert row.modalities_in_study == {"CT", "SR"}
        assert row.number_of_series == 3
        assert row.patient_name == "Ünïcødé^Test"


def test_identical_resend_is_one_event(grid, taps, metadata_dc1):
    tap = taps()
    ds = make_instance()
    assert c_store(grid.site("A"), [ds]) == [0]
    assert len(events_for(tap, [ds.SOPInstanceUID])) == 1
    wait_for(lambda: metadata_dc1.instance_location(ds.SOPInstanceUID))
    assert c_store(grid.site("A"), [ds]) == [0]
    tap.catch_up()
    assert len([e for e in tap.seen if e["instance"]["sop_instance_uid"] == ds.SOPInstanceUID]) == 1


def test_changed_payload_becomes_version_two(grid, taps, metadata_dc1):
    tap = taps()
    ds = make_instance()
    assert c_store(grid.site("A"), [ds]) == [0]
    first = events_for(tap, [ds.SOPInstanceUID])[0]
    wait_for(lambda: metadata_dc1.instance_location(ds.SOPInstanceUID))
    ds.PatientName = "Corrected^Name"
    assert c_store(grid.site("A"), [ds]) == [0]
    events = events_for(tap, [ds.SOPInstanceUID], n=2)
    # The event names the new payload; the indexer numbers it (schema version 2), replacing version 1.
    assert events[1]["payload"]["sha256"] != first["payload"]["sha256"]
    wait_for(lambda: (loc := metadata_dc1.instance_location(ds.SOPInstanceUID)) and loc.version == 2)
    assert metadata_dc1.instance_location(ds.SOPInstanceUID).sha256 == events[1]["payload"]["sha256"]
    assert indexed_versions(metadata_dc1, ds.SOPInstanceUID) == {first["payload"]["sha256"]: 1,
                                                                 events[1]["payload"]["sha256"]: 2}


@pytest.mark.parametrize(
    "field, value, status",
    [
        ("StudyInstanceUID", "../../etc/passwd", 0xC001),
        ("SeriesInstanceUID", "1." + "9" * 199, 0xC001),
        ("StudyInstanceUID", "1.2.ABC", 0xC001),
    ],
)
def test_hostile_uids_get_a_failure_status_and_leave_no_trace(grid, taps, field, value, status):
    tap = taps()
    ds = make_instance()
    setattr(ds, field, value)
    blobs_before = set(BlobStore(grid.config.site_storage("A"), "A").digests())
    assert c_store(grid.site("A"), [ds]) == [status]
    assert set(BlobStore(grid.config.site_storage("A"), "A").digests()) == blobs_before
    tap.catch_up()
    assert not [e for e in tap.seen if e["instance"]["sop_instance_uid"] == ds.SOPInstanceUID]


def test_request_and_data_set_disagree(grid, tmp_path, monkeypatch):
    """The C-STORE request names one SOP Instance UID, the data set carries another: 0xA900."""
    ds = make_instance()
    data = bytearray(to_part10(ds))
    claimed = generate_uid()
    # Same length, so the file meta stays well-formed; the request UIDs come from the file meta.
    claimed = (claimed + "1" * 64)[: len(ds.SOPInstanceUID)]
    meta_end = split_file_meta(io.BytesIO(bytes(data)))[1]
    data[:meta_end] = bytes(data[:meta_end]).replace(ds.SOPInstanceUID.encode(), claimed.encode())
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(bytes(data))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(grid.site("A"), contexts=[build_context(CTImageStorage, ExplicitVRLittleEndian)])
    try:
        assert assoc.send_c_store(path).Status == 0xA900
    finally:
        assoc.release()


def test_unknown_calling_ae_is_rejected_and_audited(grid, taps):
    tap = taps(schemas.TOPIC_AUDIT)
    assoc = associate(grid.site("A"), calling_ae="INTRUDER")
    assert assoc.is_rejected
    audits = tap.collect(lambda seen: any(a["event"] == "Security Alert" and
                                          any(p["user_id"] == "INTRUDER" for p in a["participants"]) for a in seen))
    alert = next(a for a in audits if a["event"] == "Security Alert")
    schemas.validate_event(schemas.TOPIC_AUDIT, alert)
    assert alert["site"] == "A" and alert["outcome"] != 0


def test_association_aborted_mid_transfer_stores_nothing(grid, taps):
    """A PACS that dies mid-C-STORE: no blob, no event; the receiver keeps serving."""
    tap = taps()
    site = grid.site("A")
    ds = make_instance(pixel_bytes=64)
    ds.PixelData = b"\x00" * (2 << 20)
    blobs_before = set(BlobStore(grid.config.site_storage("A"), "A").digests())
    threads_before = receiver_threads(grid, "A")
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    ae.maximum_pdu_size = 16384
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established

    sent = {"pdus": 0}

    def count_and_cut(event):
        sent["pdus"] += 1
        # The acceptor's maximum PDU (256 KiB) sizes what is sent: cut after the command and ~512 KiB.
        if sent["pdus"] == 3:
            # Cut the TCP connection: no A-ABORT, no release, as when a modality loses power.
            sock = event.assoc.dul.socket.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    from pynetdicom import evt

    assoc.bind(evt.EVT_PDU_SENT, count_and_cut)
    try:
        assoc.send_c_store(ds)
    except Exception:
        pass
    assoc.abort()
    # The receiver is done with the association (nothing of it can still be stored or published)
    # once the threads pynetdicom runs it on have ended.
    wait_for(lambda: receiver_threads(grid, "A") <= threads_before, timeout=30, interval=0.1)
    assert set(BlobStore(grid.config.site_storage("A"), "A").digests()) == blobs_before
    tap.catch_up()
    assert not [e for e in tap.seen if e["instance"]["sop_instance_uid"] == ds.SOPInstanceUID]
    # The site still serves the next PACS.
    assert c_store(site, [make_instance()]) == [0]


def _multipart(parts: list[bytes], boundary: str = "dicomgrid-test-boundary") -> tuple[bytes, str]:
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_rs_stores_and_reports(grid, taps, metadata_dc2):
    tap = taps()
    site = grid.site("B")
    study = generate_uid()
    good = [make_instance(study_uid=study) for _ in range(2)]
    bad = make_instance(study_uid=study)
    bad.SOPInstanceUID = "1.2.bad"
    body, content_type = _multipart([to_part10(ds) for ds in good] + [to_part10(bad)])
    url = f"http://{site.http_host}:{site.http_port}/dicomweb/studies/{study}"
    response = web.post(url, content=body, headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 202, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    payload = response.json()
    stored = {item["00081155"]["Value"][0] for item in payload["00081199"]["Value"]}
    assert stored == {ds.SOPInstanceUID for ds in good}
    (failed,) = payload["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC001]
    events = events_for(tap, stored)
    assert {e["source"]["protocol"] for e in events} == {"STOW-RS"}
    assert all(e["site"] == "B" for e in events)
    wait_for(lambda: (row := metadata_dc2.study(study)) and row.number_of_instances == 2)
    # Byte-identical data sets.
    blobs = BlobStore(grid.config.site_storage("B"), "B")
    for ds in good:
        sent = to_part10(ds)
        event = next(e for e in events if e["instance"]["sop_instance_uid"] == ds.SOPInstanceUID)
        stored_bytes = blobs.path(event["payload"]["sha256"]).read_bytes()
        _, a = split_file_meta(io.BytesIO(sent))
        _, b = split_file_meta(io.BytesIO(stored_bytes))
        assert stored_bytes[b:] == sent[a:]


def test_stow_rs_rejects_bad_requests(grid):
    site = grid.site("B")
    base = f"http://{site.http_host}:{site.http_port}/dicomweb/studies"
    assert web.post(base, content=b"x", headers={"Content-Type": "application/json"}).status_code == 415
    body, content_type = _multipart([to_part10(make_instance())])
    assert web.post(f"{base}/not-a-uid", content=body, headers={"Content-Type": content_type}).status_code == 400
    response = web.post(base, content=b"--nope\r\n", headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=zzz'})
    assert response.status_code == 400
    # A study UID in the path that the instance does not belong to: 409 (nothing stored).
    body, content_type = _multipart([to_part10(make_instance())])
    response = web.post(f"{base}/{generate_uid()}", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]



def test_back_to_back_resends_are_versioned_without_waiting_for_the_indexer(grid, taps, metadata_dc1):
    """Original, changed, changed again on one association: v1, v2 replacing v1, then no event."""
    tap = taps()
    ds = make_instance()
    original = copy.deepcopy(ds)
    ds.PatientName = "Changed^Right^Away"
    assert c_store(grid.site("A"), [original, ds, ds]) == [0, 0, 0]
    events = events_for(tap, [ds.SOPInstanceUID], n=2)
    tap.catch_up()
    mine = [e for e in tap.seen if e["instance"]["sop_instance_uid"] == ds.SOPInstanceUID]
    assert len(mine) == 2 and mine[0]["payload"]["sha256"] != mine[1]["payload"]["sha256"]
    # The indexer numbers them in the order received: v1, then v2 replacing it.
    wait_for(lambda: (loc := metadata_dc1.instance_location(ds.SOPInstanceUID)) and loc.version == 2)
    assert metadata_dc1.instance_location(ds.SOPInstanceUID).sha256 == mine[1]["payload"]["sha256"]
    assert indexed_versions(metadata_dc1, ds.SOPInstanceUID) == {mine[0]["payload"]["sha256"]: 1,
                                                                 mine[1]["payload"]["sha256"]: 2}

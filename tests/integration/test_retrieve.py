"""Retrieve on the real cluster: C-GET, C-MOVE and WADO-RS, across sites, with a damaged local replica.

Studies are built from pydicom's test files in several transfer syntaxes (explicit VR little endian,
deflated, JPEG baseline, RLE) with fresh UIDs, so runs never collide. "Byte-identical" means the data set
bytes a client receives are the bytes that were sent in: the grid replaces only the file meta.
"""

from __future__ import annotations

import io
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom.data
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.dicomfile import split_file_meta
from dicomgrid.core.dimse import set_nodelay
from tests.dicom_samples import make_instance, to_part10
from tests.grid import wait_for, bearer, web

pytestmark = [pytest.mark.cluster]

SAMPLES = Path(pydicom.data.__file__).parent / "test_files"
MIXED = ("CT_small.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm", "CT_small.dcm")


# -- building and storing studies ---------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One instance as it was sent in."""

    sop_class: str
    sop_uid: str
    series_uid: str
    transfer_syntax: str
    part10: bytes

    @property
    def data_set(self) -> bytes:
        return data_set_bytes(self.part10)


@dataclass(frozen=True)
class Study:
    uid: str
    patient_id: str
    instances: tuple[Sent, ...]

    def by_uid(self) -> dict[str, Sent]:
        return {item.sop_uid: item for item in self.instances}

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {(item.sop_class, item.transfer_syntax) for item in self.instances}


def data_set_bytes(part10: bytes) -> bytes:
    _, offset = split_file_meta(io.BytesIO(part10))
    return part10[offset:]


def mixed_study(names: tuple[str, ...] = MIXED) -> Study:
    """pydicom test files as one new study: fresh Study/Series/SOP Instance UIDs, original encodings."""
    study, patient = generate_uid(), f"RT-{uuid.uuid4().hex[:10]}"
    series = [generate_uid(), generate_uid()]
    sent = []
    for index, name in enumerate(names):
        ds = dcmread(SAMPLES / name)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series[index % 2]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = patient
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        sent.append(Sent(str(ds.SOPClassUID), ds.SOPInstanceUID, ds.SeriesInstanceUID,
                         str(ds.file_meta.TransferSyntaxUID), buffer.getvalue()))
    return Study(study, patient, tuple(sent))


def generated_study(count: int, pixel_bytes: int = 64) -> Study:
    study, patient, series = generate_uid(), f"RT-{uuid.uuid4().hex[:10]}", generate_uid()
    sent = []
    for number in range(count):
        ds = make_instance(study_uid=study, series_uid=series, patient_id=patient, pixel_bytes=pixel_bytes,
                           InstanceNumber=number + 1)
        sent.append(Sent(str(ds.SOPClassUID), ds.SOPInstanceUID, series, str(ds.file_meta.TransferSyntaxUID),
                         to_part10(ds)))
    return Study(study, patient, tuple(sent))


def base_url(site) -> str:
    return f"http://{site.http_host}:{site.http_port}"


def stow(site, parts: list[bytes]) -> None:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    body += f"--{boundary}--\r\n".encode()
    response = web.post(
        f"{base_url(site)}/dicomweb/studies",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def store_and_index(grid, study: Study, site: str = "A", dcs: tuple[str, ...] = ("dc1", "dc2")) -> None:
    """STOW-RS the study to ``site``; wait until every datacenter named indexes all of it."""
    for start in range(0, len(study.instances), 25):
        stow(grid.site(site), [item.part10 for item in study.instances[start:start + 25]])
    for dc in dcs:
        store = grid.metadata(dc)
        try:
            wait_for(lambda: len(store.instances_of_study(study.uid)) == len(study.instances), timeout=60)
        finally:
            store.db.close()


def digests(grid, study: Study, dc: str = "dc1") -> dict[str, str]:
    store = grid.metadata(dc)
    try:
        return {row.sop_instance_uid: row.sha256 for row in store.instances_of_study(study.uid)}
    finally:
        store.db.close()


def blobs(grid, site: str) -> BlobStore:
    return BlobStore(grid.config.site_storage(site), site)


# -- DICOM clients ----------------------------------------------------------------------------


@dataclass
class GetResult:
    responses: list[Dataset]
    received: dict[str, bytes]
    seconds: float

    @property
    def final(self) -> Dataset:
        return self.responses[-1]


def c_get(site, identifier: Dataset, pairs: set[tuple[str, str]], *, model=StudyRootQueryRetrieveInformationModelGet,
          cancel_after: int | None = None) -> GetResult:
    """C-GET with one storage context per (SOP class, transfer syntax) and SCP role selection."""
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.maximum_pdu_size = 256 * 1024
    ae.add_requested_context(model)
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, ts)
    roles = [build_role(sop_class, scp_role=True) for sop_class in sorted({p[0] for p in pairs})]
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established
    responses = []
    started = time.monotonic()
    try:
        for status, _ in assoc.send_c_get(identifier, model, msg_id=7):
            responses.append(status)
            if cancel_after is not None and status.Status == 0xFF00 and len(responses) == cancel_after:
                assoc.send_c_cancel(7, query_model=model)
    finally:
        seconds = time.monotonic() - started
        assoc.release()
    return GetResult(responses, received, seconds)


def study_identifier(study_uid: str, level: str = "STUDY", **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = study_uid
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def assert_identical(study: Study, received: dict[str, bytes]) -> None:
    assert set(received) == set(study.by_uid())
    for uid, sent in study.by_uid().items():
        assert received[uid] == sent.data_set, f"{uid} ({sent.transfer_syntax}) differs"


def parse_multipart(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related") and 'type="application/dicom"' in content_type
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    parts = []
    for chunk in response.content.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append(({k.lower(): v for k, v in headers.items()}, body[:-2]))
    return parts


def wado_study(site, study_uid: str, **headers: str) -> httpx.Response:
    return web.get(f"{base_url(site)}/dicomweb/studies/{study_uid}", headers=headers, timeout=60)


def audits_for(tap, study_uid: str, event: str, site: str, timeout: float = 15.0) -> list[dict]:
    def matching(seen):
        return [a for a in seen if a["event"] == event and a["site"] == site
                and any(o["type"] == "study" and o["id"] == study_uid for o in a["objects"])]

    return matching(tap.collect(lambda seen: bool(matching(seen)), timeout=timeout))


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(grid) -> Study:
    study = mixed_study()
    store_and_index(grid, study)
    return study


@dataclass
class MoveDestination:
    received: dict[str, bytes]
    originators: set[str]


@pytest.fixture
def storage_scp_at_move_destination(grid) -> Iterator[MoveDestination]:
    """A pynetdicom storage SCP listening as the configured move destination STORESCP."""
    peer = grid.config.remote_aes["STORESCP"]
    with socket.socket() as probe:
        if probe.connect_ex((peer.host, peer.port)) == 0:
            pytest.skip(f"something already listens on the STORESCP move destination {peer.host}:{peer.port}")
    destination = MoveDestination({}, set())

    def on_store(event: evt.Event) -> int:
        request = event.request
        destination.received[str(request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        destination.originators.add(request.MoveOriginatorApplicationEntityTitle)
        return 0x0000

    ae = AE(ae_title="STORESCP")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server((peer.host, peer.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield destination
    finally:
        server.shutdown()


# -- tests ----------------------------------------------------------------------------------------


def test_c_get_mixed_transfer_syntaxes_byte_identical_and_audited(grid, taps, mixed):
    tap = taps(schemas.TOPIC_AUDIT)
    result = c_get(grid.site("A"), study_identifier(mixed.uid), mixed.pairs)
    assert result.final.Status == 0x0000
    assert result.final.NumberOfCompletedSuboperations == len(mixed.instances)
    assert result.final.NumberOfFailedSuboperations == 0
    pending = [r for r in result.responses if r.Status == 0xFF00]
    assert [r.NumberOfRemainingSuboperations for r in pending] == list(range(len(mixed.instances) - 1, -1, -1))
    assert_identical(mixed, result.received)

    (transferred,) = audits_for(tap, mixed.uid, "DICOM Instances Transferred", "A")
    schemas.validate_event(schemas.TOPIC_AUDIT, transferred)
    assert transferred["action"] == "R" and transferred["outcome"] == 0
    assert {o["id"] for o in transferred["objects"] if o["type"] == "instance"} == set(mixed.by_uid())
    assert any(p["ae_title"] == "GETSCU" for p in transferred["participants"])
    assert audits_for(tap, mixed.uid, "Begin Transferring DICOM Instances", "A")


def test_c_get_series_and_image_levels_and_patient_root(grid, mixed):
    site = grid.site("A")
    series_uid = mixed.instances[0].series_uid
    in_series = {u: s for u, s in mixed.by_uid().items() if s.series_uid == series_uid}
    result = c_get(site, study_identifier(mixed.uid, "SERIES", SeriesInstanceUID=series_uid), mixed.pairs)
    assert result.final.Status == 0x0000 and set(result.received) == set(in_series)

    two = list(in_series)[:2]
    result = c_get(site, study_identifier(mixed.uid, "IMAGE", SeriesInstanceUID=series_uid, SOPInstanceUID=two),
                   mixed.pairs)
    assert result.final.Status == 0x0000 and set(result.received) == set(two)

    patient = Dataset()
    patient.QueryRetrieveLevel = "PATIENT"
    patient.PatientID = mixed.patient_id
    result = c_get(site, patient, mixed.pairs, model=PatientRootQueryRetrieveInformationModelGet)
    assert result.final.Status == 0x0000
    assert_identical(mixed, result.received)


def test_c_get_without_a_matching_context_fails_only_those_instances(grid, mixed):
    explicit = {p for p in mixed.pairs if p[1] == "1.2.840.10008.1.2.1"}
    result = c_get(grid.site("A"), study_identifier(mixed.uid), explicit)
    expected = {u for u, s in mixed.by_uid().items() if s.transfer_syntax == "1.2.840.10008.1.2.1"}
    assert result.final.Status == 0xB000
    assert set(result.received) == expected
    assert result.final.NumberOfFailedSuboperations == len(mixed.instances) - len(expected)


def test_wado_rs_round_trip_is_byte_identical(grid, mixed):
    site = grid.site("A")
    response = wado_study(site, mixed.uid)
    assert response.status_code == 200
    parts = parse_multipart(response)
    by_uid = mixed.by_uid()
    assert len(parts) == len(by_uid)
    for headers, body in parts:
        meta, _ = split_file_meta(io.BytesIO(body))
        sent = by_uid[str(meta.MediaStorageSOPInstanceUID)]
        assert data_set_bytes(body) == sent.data_set
        assert headers["content-type"].endswith(f"transfer-syntax={sent.transfer_syntax}")

    one = mixed.instances[1]
    url = f"{base_url(site)}/dicomweb/studies/{mixed.uid}/series/{one.series_uid}/instances/{one.sop_uid}"
    (part,) = parse_multipart(web.get(url, timeout=30))
    assert data_set_bytes(part[1]) == one.data_set

    wado_uri = web.get(f"{base_url(site)}/wado", params={
        "requestType": "WADO", "studyUID": mixed.uid, "seriesUID": one.series_uid, "objectUID": one.sop_uid,
        "contentType": "application/dicom"}, timeout=30)
    assert wado_uri.status_code == 200 and wado_uri.headers["content-type"] == "application/dicom"
    assert data_set_bytes(wado_uri.content) == one.data_set


def test_wado_rs_metadata_and_dicomweb_client(grid, mixed):
    client = DICOMwebClient(f"{base_url(grid.site('A'))}/dicomweb", headers=bearer(grid.config, "read"))
    retrieved = client.retrieve_study(mixed.uid)
    assert {ds.SOPInstanceUID for ds in retrieved} == set(mixed.by_uid())
    for ds in retrieved:
        original = dcmread(io.BytesIO(mixed.by_uid()[ds.SOPInstanceUID].part10))
        assert ds.PixelData == original.PixelData

    metadata = client.retrieve_study_metadata(mixed.uid)
    assert {m["00080018"]["Value"][0] for m in metadata} == set(mixed.by_uid())
    assert all("7FE00010" not in m for m in metadata)
    assert all(m["0020000D"]["Value"] == [mixed.uid] for m in metadata)

    series_uid = mixed.instances[0].series_uid
    series_meta = client.retrieve_series_metadata(mixed.uid, series_uid)
    assert {m["0020000E"]["Value"][0] for m in series_meta} == {series_uid}


def test_wado_rs_refuses_bad_requests_cleanly(grid, mixed):
    base = f"{base_url(grid.site('A'))}/dicomweb/studies"
    assert web.get(f"{base}/not.a.uid").status_code == 400
    assert web.get(f"{base}/1.{'9' * 80}").status_code == 400
    assert web.get(f"{base}/{mixed.uid}/series/1.02").status_code == 400
    assert web.get(f"{base}/{generate_uid()}").status_code == 404
    assert web.get(f"{base}/{generate_uid()}/metadata").status_code == 404
    assert web.get(f"{base}/{mixed.uid}/series/{generate_uid()}/instances/{generate_uid()}").status_code == 404
    assert wado_study(grid.site("A"), mixed.uid, Accept="image/jpeg").status_code == 406
    jpeg_only = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert wado_study(grid.site("A"), mixed.uid, Accept=jpeg_only).status_code == 406
    assert web.get(f"{base}/{mixed.uid}/metadata", headers={"Accept": "application/dicom+xml"}).status_code == 406
    wado = f"{base_url(grid.site('A'))}/wado"
    assert web.get(wado, params={"requestType": "WADO", "studyUID": "x"}).status_code == 400
    assert web.get(wado, params={"requestType": "WADO", "studyUID": mixed.uid, "seriesUID": generate_uid(),
                                   "objectUID": generate_uid(), "contentType": "image/jpeg"}).status_code == 406
    # Nothing else is affected.
    assert wado_study(grid.site("A"), mixed.uid).status_code == 200


@pytest.mark.filterwarnings("ignore:The value length")
def test_c_get_and_c_move_refuse_bad_identifiers(grid, mixed):
    site = grid.site("A")
    bad_level = study_identifier(mixed.uid, "FRAME")
    result = c_get(site, bad_level, mixed.pairs)
    assert result.final.Status == 0xA900 and not result.received
    assert "QueryRetrieveLevel" in result.final.ErrorComment
    absurd = study_identifier("../../" + "9" * 70)
    assert c_get(site, absurd, mixed.pairs).final.Status == 0xA900
    nothing = c_get(site, study_identifier(generate_uid()), mixed.pairs)
    assert nothing.final.Status == 0x0000 and nothing.final.NumberOfCompletedSuboperations == 0

    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    try:
        unknown = [s for s, _ in assoc.send_c_move(study_identifier(mixed.uid), "NOWHERE",
                                                   StudyRootQueryRetrieveInformationModelMove)]
        assert unknown[-1].Status == 0xA801
        refused = [s for s, _ in assoc.send_c_move(bad_level, "STORESCP", StudyRootQueryRetrieveInformationModelMove)]
        assert 0xC000 <= refused[-1].Status <= 0xCFFF
    finally:
        assoc.release()
    # The site keeps serving.
    assert c_get(site, study_identifier(mixed.uid), mixed.pairs).final.Status == 0x0000


def test_c_move_sends_exactly_what_was_stored(grid, mixed, storage_scp_at_move_destination):
    site = grid.site("B")
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established
    try:
        responses = [s for s, _ in assoc.send_c_move(study_identifier(mixed.uid), "STORESCP",
                                                     StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    assert responses[-1].Status == 0x0000
    assert responses[-1].NumberOfCompletedSuboperations == len(mixed.instances)
    assert_identical(mixed, storage_scp_at_move_destination.received)
    assert storage_scp_at_move_destination.originators == {"MOVESCU"}


def test_study_stored_at_a_is_retrieved_at_b_then_survives_losing_a_replica(grid, taps):
    study = mixed_study(("CT_small.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm"))
    store_and_index(grid, study)
    shas = digests(grid, study)
    a, b = blobs(grid, "A"), blobs(grid, "B")
    assert all(a.exists(d) for d in shas.values())
    # Replication gives B its copies; then B loses them all (a lost disk).
    wait_for(lambda: all(b.verify(d) for d in shas.values()), timeout=60)
    for digest in shas.values():
        b.path(digest).unlink()
    tap = taps(schemas.TOPIC_AUDIT)

    # B holds no copy: WADO-RS at B fetches from A's payload endpoint, verifies and keeps the copies.
    response = wado_study(grid.site("B"), study.uid)
    assert response.status_code == 200
    assert {data_set_bytes(body) for _, body in parse_multipart(response)} == {s.data_set for s in study.instances}
    assert all(b.verify(d) for d in shas.values())
    repairs = tap.collect(lambda seen: sum(1 for r in seen if r["site"] == "B" and any(
        o["type"] == "payload" and o["id"] in shas.values() for o in r["objects"]) and r["action"] == "C"
    ) >= len(shas), timeout=15)
    assert len({o["id"] for r in repairs if r["site"] == "B" and r["action"] == "C" for o in r["objects"]
                if o["type"] == "payload"} & set(shas.values())) == len(shas)

    # A loses one replica and another is corrupted: retrieve at A is served from B's copies.
    uids = list(shas)
    lost, damaged = a.path(shas[uids[0]]), a.path(shas[uids[1]])
    lost.unlink()
    os.chmod(damaged, 0o644)
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = c_get(grid.site("A"), study_identifier(study.uid), study.pairs)
    assert result.final.Status == 0x0000
    assert_identical(study, result.received)
    assert a.verify(shas[uids[0]]) and a.verify(shas[uids[1]])
    assert any(p.name.startswith(shas[uids[1]]) for p in (a.root / "quarantine").iterdir())

    # And once more over WADO-RS at A, now from repaired local copies.
    assert {data_set_bytes(body) for _, body in parse_multipart(wado_study(grid.site("A"), study.uid))} == {
        s.data_set for s in study.instances}


def test_c_cancel_stops_a_c_get_and_throughput(grid, capsys):
    study = generated_study(50, pixel_bytes=64 * 1024)
    store_and_index(grid, study, dcs=("dc1",))
    site = grid.site("A")

    result = c_get(site, study_identifier(study.uid), study.pairs)
    assert result.final.Status == 0x0000
    assert_identical(study, result.received)
    megabytes = sum(len(v) for v in result.received.values()) / 1e6
    with capsys.disabled():
        print(f"\nC-GET of {len(study.instances)} instances ({megabytes:.1f} MB) in {result.seconds:.2f}s: "
              f"{len(study.instances) / result.seconds:.0f} instances/s, {megabytes / result.seconds:.1f} MB/s")

    cancelled = c_get(site, study_identifier(study.uid), study.pairs, cancel_after=3)
    assert cancelled.final.Status == 0xFE00
    assert 3 <= len(cancelled.received) < len(study.instances)
    assert cancelled.final.NumberOfRemainingSuboperations == len(study.instances) - len(cancelled.received)

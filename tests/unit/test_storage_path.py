"""The site's storage path (associations that only store), served by a site AE in this process with a
real blob store and an in-memory stand-in for the brokers, against DCMTK storescu, pynetdicom and
hand-made PDUs."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from pydicom import dcmread
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification  # type: ignore[attr-defined]

from dicomgrid import schemas
from dicomgrid.core import pki, ul
from dicomgrid.core.audit import MINOR_FAILURE, SUCCESS, AuditTrail, to_xml
from dicomgrid.core.blobstore import BlobStore, BlobStoreError
from dicomgrid.core.dicomfile import split_file_meta
from dicomgrid.core.dimse import SiteAE
from dicomgrid.core.dimse_commands import parse_command
from dicomgrid.core.tls import client_context
from dicomgrid.deploy.local.dcmtk import dcmtk_tool
from dicomgrid.producers import storage_path
from dicomgrid.producers.ingest import Ingestor
from dicomgrid.producers.storage_path import StoragePath
from dicomgrid.producers.storage_scp import StorageService
from tests.dicom_samples import make_instance, to_part10
from tests.unit.peer_sites import RecordingAudit
from tests.unit.test_dicom_tls import _config
from tests.unit.test_ingest import FakePublisher, NoCassandra
from tests.unit.test_ul import _encoded_by_pynetdicom, _pynetdicom_request


class Site:
    def __init__(self, tmp_path: Path, extra: str, max_instance_bytes: int) -> None:
        self.config = _config(tmp_path, extra)
        self.publisher = FakePublisher()
        self.blobs = BlobStore(self.config.site_storage("A"), "A")
        self.ingestor = Ingestor("A", self.blobs, self.publisher, NoCassandra(), AuditTrail("A", self.publisher),
                                 max_instance_bytes=max_instance_bytes)
        self.audit = RecordingAudit()
        self.site = self.config.site("A")

    def stored(self) -> list[dict]:
        return self.publisher.of(schemas.TOPIC_INSTANCE_STORED)

    def audited(self, text: str) -> list[dict]:
        return [r for r in self.publisher.of(schemas.TOPIC_AUDIT) if text in str(r)]


@pytest.fixture
def direct_serves(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The calling AE title of every association the storage path served."""
    served: list[str] = []
    original = StoragePath.serve

    def serve(self, sock, request, peer):
        served.append(request.calling_ae)
        return original(self, sock, request, peer)

    monkeypatch.setattr(StoragePath, "serve", serve)
    return served


@pytest.fixture
def start(tmp_path: Path, pynetdicom_settings) -> Iterator:
    running = []

    def run(extra: str = "", max_instance_bytes: int = 1 << 20) -> Site:
        site = Site(tmp_path, extra, max_instance_bytes)
        storage = StorageService(site.ingestor, site.site.ae_title)
        running.append(SiteAE(site.config, "A", [storage], site.audit).serve(spool_dir=storage.spool_dir, block=False))
        return site

    yield run
    for listeners in running:
        listeners.shutdown()
        listeners.server_close()


def _dataset_bytes(part10: bytes) -> bytes:
    _, offset = split_file_meta(io.BytesIO(part10))
    return part10[offset:]


def _associate(site: Site, calling_ae: str = "STORESCU", *contexts: tuple[str, list[str]]):
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    for uid, syntaxes in contexts or ((CTImageStorage, [ExplicitVRLittleEndian]),):
        ae.add_requested_context(uid, syntaxes)
    return ae.associate(site.site.dicom_host, site.site.dicom_port, ae_title=site.site.ae_title)


def _storescu() -> str:
    tool = dcmtk_tool("storescu")
    if tool is None:
        pytest.skip("DCMTK storescu is not installed")
    return tool


def test_dcmtk_storescu_stores_byte_for_byte_on_the_storage_path(start, direct_serves, tmp_path: Path):
    site = start()
    files = []
    for number in range(5):
        path = tmp_path / f"ct{number}.dcm"
        path.write_bytes(to_part10(make_instance(pixel_bytes=64 + 2048 * number)))
        files.append(path)
    done = subprocess.run([_storescu(), "-aet", "STORESCU", "-aec", site.site.ae_title, site.site.dicom_host,
                           str(site.site.dicom_port), *map(str, files)],
                          env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert direct_serves == ["STORESCU"]
    events = site.stored()
    assert len(events) == 5
    by_instance = {e["instance"]["sop_instance_uid"]: e for e in events}
    for path in files:
        sent = path.read_bytes()
        _, offset = split_file_meta(io.BytesIO(sent))
        uid = dcmread(path).SOPInstanceUID
        stored = site.blobs.path(by_instance[uid]["payload"]["sha256"]).read_bytes()
        assert _dataset_bytes(stored) == sent[offset:]
    assert not list((site.blobs.root / "tmp").iterdir())


def test_pynetdicom_echo_and_stores_in_each_syntax_with_the_right_statuses(start, direct_serves):
    site = start(max_instance_bytes=64 * 1024)
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    assoc = _associate(site, "STORESCU", (Verification, [ImplicitVRLittleEndian]),
                       *((CTImageStorage, [ts]) for ts in syntaxes))
    assert assoc.is_established
    assert assoc.accepted_contexts and len(assoc.accepted_contexts) == 4
    assert assoc.send_c_echo().Status == 0x0000
    sent = {}
    for ts in syntaxes:
        ds = make_instance()
        ds.file_meta.TransferSyntaxUID = ts
        # The same data set in each syntax: the context of that syntax carries it.
        sent[ds.SOPInstanceUID] = ds
        assert assoc.send_c_store(ds).Status == 0x0000
    # Over the site's instance size limit: refused, nothing kept.
    big = make_instance(pixel_bytes=128 * 1024)
    big.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    response = assoc.send_c_store(big)
    assert response.Status == 0xA702
    # Kafka unavailable: out of resources, the payload stays harmless in the store.
    site.publisher.down = True
    assert assoc.send_c_store(make_instance()).Status == 0xA701
    site.publisher.down = False
    assoc.release()
    assert direct_serves == ["STORESCU"]
    stored = {e["instance"]["sop_instance_uid"]: e for e in site.stored()}
    assert set(stored) == set(sent)
    for uid, ds in sent.items():
        event = stored[uid]
        assert event["instance"]["transfer_syntax_uid"] == ds.file_meta.TransferSyntaxUID
        meta, _ = split_file_meta(io.BytesIO(site.blobs.path(event["payload"]["sha256"]).read_bytes()))
        assert meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert not list((site.blobs.root / "tmp").iterdir())


def test_an_associations_stores_are_audited_in_one_record_and_a_refusal_on_its_own(start, direct_serves):
    site = start(max_instance_bytes=64 * 1024)
    assoc = _associate(site, "STORESCU", (CTImageStorage, [ExplicitVRLittleEndian]))
    sent = []
    for n in range(4):
        ds = make_instance(patient_id=f"PAT-{n % 2}")  # two patients, a study each
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert assoc.send_c_store(ds).Status == 0x0000
        sent.append(ds)
    big = make_instance(pixel_bytes=128 * 1024)
    big.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert assoc.send_c_store(big).Status == 0xA702
    # The refusal is audited at once; the stores when the association ends.
    (refused,) = [r for r in site.publisher.of(schemas.TOPIC_AUDIT) if r["event"] == "DICOM Instances Transferred"]
    assert refused["outcome"] == MINOR_FAILURE and big.SOPInstanceUID in str(refused["objects"])
    assoc.release()
    deadline = time.monotonic() + 5
    while len(site.audited("DICOM Instances Transferred")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert direct_serves == ["STORESCU"]
    (stored,) = [r for r in site.audited("DICOM Instances Transferred") if r["outcome"] == SUCCESS]
    assert stored["outcome_description"] == "DIMSE stored: 4 instances"
    assert [o["id"] for o in stored["objects"] if o["type"] == "instance"] == [ds.SOPInstanceUID for ds in sent]
    assert {o["id"] for o in stored["objects"] if o["type"] == "study"} == {ds.StudyInstanceUID for ds in sent}
    assert {o["id"] for o in stored["objects"] if o["type"] == "patient"} == {"PAT-0", "PAT-1"}
    assert [t["code"] for t in stored["event_type_codes"]] == ["RAD-8"]  # Modality Images Stored
    validator = schemas.audit_message_schema()
    assert validator.validate(etree.fromstring(to_xml(stored))), validator.error_log


def test_associations_that_also_query_stay_with_pynetdicom(start, direct_serves):
    site = start()
    assoc = _associate(site, "STORESCU", (CTImageStorage, [ExplicitVRLittleEndian]),
                       (StudyRootQueryRetrieveInformationModelFind, [ImplicitVRLittleEndian]))
    assert assoc.is_established
    ds = make_instance()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert direct_serves == []
    assert [e["instance"]["sop_instance_uid"] for e in site.stored()] == [ds.SOPInstanceUID]
    # Audited as on the storage path: in one record, once the connection has closed.
    deadline = time.monotonic() + 5
    while not site.audited("DIMSE stored: 1 instance") and time.monotonic() < deadline:
        time.sleep(0.02)
    (stored,) = site.audited("DIMSE stored: 1 instance")
    assert [o["id"] for o in stored["objects"] if o["type"] == "instance"] == [ds.SOPInstanceUID]


def test_refusals_stay_with_pynetdicom_and_are_audited(start, direct_serves):
    site = start('[limits]\nmax_associations_per_calling_ae = 1\n[security]\nallowed_calling_aes = ["STORESCU"]\n'
                 'allow_any_calling_ae = false\n')
    first = _associate(site, "STORESCU")
    assert first.is_established
    second = _associate(site, "STORESCU")
    assert second.is_rejected
    stranger = _associate(site, "STRANGER")
    assert stranger.is_rejected
    first.release()
    assert direct_serves == ["STORESCU"]
    reasons = [r["description"] for r in site.audit.records if r["event"] == "Security Alert"]
    assert any("per calling AE" in r for r in reasons)
    assert any("calling AE title not allowed" in r for r in reasons)


def _raw_association(site: Site) -> tuple[socket.socket, int]:
    """A hand-made association whose CT context (explicit VR little endian) is accepted; returns the
    socket and that context's ID."""
    sock = socket.create_connection((site.site.dicom_host, site.site.dicom_port), timeout=5)
    sock.sendall(_pynetdicom_request(roles=False, ct_syntaxes=(ExplicitVRLittleEndian,)))
    kind, length = ul.pdu_header(_recv_exactly(sock, 6))
    assert kind == ul.ASSOCIATE_AC
    _recv_exactly(sock, length)
    return sock, 1


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _store_command(sop_instance_uid: str) -> bytes:
    return _encoded_by_pynetdicom(C_STORE_RQ, C_STORE, AffectedSOPClassUID=CTImageStorage, MessageID=1, Priority=0,
                                  AffectedSOPInstanceUID=sop_instance_uid,
                                  DataSet=io.BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00"))


def _response_status(sock: socket.socket) -> int:
    kind, length = ul.pdu_header(_recv_exactly(sock, 6))
    assert kind == ul.P_DATA_TF
    ((_, control, fragment),) = list(ul.iter_pdvs(memoryview(_recv_exactly(sock, length))))
    assert control & ul.PDV_COMMAND and control & ul.PDV_LAST
    return parse_command(fragment).us(0x0900)


def _send_store(sock: socket.socket, context_id: int, ds, named_uid: str | None = None) -> None:
    """Sends one C-STORE of ``ds``, its request naming ``named_uid`` if given."""
    sock.sendall(ul.encode_p_data(context_id, _store_command(named_uid or ds.SOPInstanceUID), command=True, max_pdu=0))
    sock.sendall(ul.encode_p_data(context_id, encode(ds, False, True), command=False, max_pdu=0))


def _store(sock: socket.socket, context_id: int, ds, named_uid: str | None = None) -> int:
    """One C-STORE of ``ds``; returns its response's status."""
    _send_store(sock, context_id, ds, named_uid)
    return _response_status(sock)


def _release(sock: socket.socket) -> None:
    sock.sendall(b"\x05\x00" + struct.pack(">L", 4) + b"\x00" * 4)  # A-RELEASE-RQ
    assert ul.pdu_header(_recv_exactly(sock, 6))[0] == ul.RELEASE_RP
    sock.close()


def test_a_data_set_that_disagrees_with_its_request_is_refused_and_the_association_goes_on(start, direct_serves):
    site = start()
    sock, context_id = _raw_association(site)
    named, sent = make_instance(), make_instance()
    assert _store(sock, context_id, sent, named_uid=named.SOPInstanceUID) == 0xA900
    # The same association stores the next instance.
    assert _store(sock, context_id, sent) == 0x0000
    _release(sock)
    assert [e["instance"]["sop_instance_uid"] for e in site.stored()] == [sent.SOPInstanceUID]
    assert site.audited("does not match")
    assert not list((site.blobs.root / "tmp").iterdir())


def test_data_on_a_context_never_accepted_aborts_and_is_audited(start, direct_serves):
    site = start()
    sock, _ = _raw_association(site)
    sock.sendall(ul.encode_p_data(99, _store_command("1.2.3"), command=True, max_pdu=0))
    kind, length = ul.pdu_header(_recv_exactly(sock, 6))
    assert kind == ul.ABORT
    sock.close()
    deadline = time.monotonic() + 5
    while not site.audited("storage association aborted") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert site.audited("presentation context 99")
    assert site.stored() == []


def test_a_sender_gone_in_the_middle_of_a_data_set_leaves_nothing(start, direct_serves):
    site = start()
    sock, context_id = _raw_association(site)
    ds = make_instance(pixel_bytes=4096)
    data_set = encode(ds, False, True)
    sock.sendall(ul.encode_p_data(context_id, _store_command(ds.SOPInstanceUID), command=True, max_pdu=0))
    # Half the data set, in a PDV that is not the last.
    half = data_set[: len(data_set) // 2]
    sock.sendall(struct.pack(">BxL", ul.P_DATA_TF, len(half) + 6) + struct.pack(">LBB", len(half) + 2, context_id, 0) + half)
    deadline = time.monotonic() + 5
    while not list((site.blobs.root / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list((site.blobs.root / "tmp").iterdir()), "the data set was not being received"
    sock.close()
    deadline = time.monotonic() + 5
    while list((site.blobs.root / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not list((site.blobs.root / "tmp").iterdir())
    assert site.stored() == []
    assert not list((site.blobs.root / "sha256").rglob("*"))


def test_dicom_tls_storage_on_the_storage_path_and_refusals_replayed_to_pynetdicom(start, direct_serves, tmp_path):
    site = start()
    config = site.config
    cert, key = tmp_path / "storescu.pem", tmp_path / "storescu-key.pem"
    pki.issue_certificate(config.tls_ca_file, cert, key, "STORESCU")
    context = client_context(config)
    context.load_cert_chain(cert, key)

    def associate(calling_ae: str):
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        return ae.associate(site.site.dicom_host, site.site.dicom_tls_port, ae_title=site.site.ae_title,
                            tls_args=(context, site.site.dicom_host))

    assoc = associate("STORESCU")
    assert assoc.is_established
    ds = make_instance()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    # The certificate does not speak for this calling AE title: the request, read already to choose
    # the path, is replayed to pynetdicom, which rejects it.
    other = associate("OTHER")
    assert other.is_rejected
    assert direct_serves == ["STORESCU"]
    assert [e["instance"]["sop_instance_uid"] for e in site.stored()] == [ds.SOPInstanceUID]
    assert "does not speak for calling AE 'OTHER'" in site.audit.records[-1]["description"]


@pytest.fixture
def short_network_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """The storage path's network timeout, shortened for the test (the site's default is 60 s)."""
    seconds = 0.5
    original = StoragePath.serve

    def serve(self, sock, request, peer):
        self.network_timeout_s = seconds
        return original(self, sock, request, peer)

    monkeypatch.setattr(StoragePath, "serve", serve)
    return seconds


def _silent_in_a_data_set(site: Site, sock: socket.socket, context_id: int, timeout_s: float) -> float:
    """Store one instance, then send half of the next data set and nothing more. Returns how long the
    site took to abort the association (after the half was sent)."""
    stored = make_instance()
    assert _store(sock, context_id, stored) == 0x0000
    ds = make_instance(pixel_bytes=4096)
    data_set = encode(ds, False, True)
    half = data_set[: len(data_set) // 2]
    sock.sendall(ul.encode_p_data(context_id, _store_command(ds.SOPInstanceUID), command=True, max_pdu=0))
    sock.sendall(struct.pack(">BxL", ul.P_DATA_TF, len(half) + 6) + struct.pack(">LBB", len(half) + 2, context_id, 0) + half)
    silent_since = time.monotonic()
    sock.settimeout(timeout_s + 10)
    kind, length = ul.pdu_header(_recv_exactly(sock, 6))
    waited = time.monotonic() - silent_since
    assert kind == ul.ABORT
    _recv_exactly(sock, length)
    assert sock.recv(1) == b"", "the site closed the connection after its A-ABORT"
    sock.close()
    # Nothing of the silent data set is kept; the instance stored before it is intact.
    deadline = time.monotonic() + 5
    while list((site.blobs.root / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not list((site.blobs.root / "tmp").iterdir())
    assert [e["instance"]["sop_instance_uid"] for e in site.stored()] == [stored.SOPInstanceUID]
    (event,) = site.stored()
    blob = site.blobs.path(event["payload"]["sha256"])
    assert _dataset_bytes(blob.read_bytes()) == encode(stored, False, True)
    return waited


def test_a_sender_silent_in_the_middle_of_a_data_set_is_aborted_after_the_network_timeout(
        start, direct_serves, short_network_timeout):
    site = start()
    sock, context_id = _raw_association(site)
    waited = _silent_in_a_data_set(site, sock, context_id, short_network_timeout)
    assert short_network_timeout * 0.9 <= waited < short_network_timeout + 3
    assert direct_serves == ["STORESCU"]


def test_a_tls_sender_silent_in_the_middle_of_a_data_set_is_aborted_after_the_network_timeout(
        start, direct_serves, short_network_timeout, tmp_path):
    import ssl

    site = start()
    cert, key = tmp_path / "storescu.pem", tmp_path / "storescu-key.pem"
    pki.issue_certificate(site.config.tls_ca_file, cert, key, "STORESCU")
    context = client_context(site.config)
    context.load_cert_chain(cert, key)
    raw = socket.create_connection((site.site.dicom_host, site.site.dicom_tls_port), timeout=5)
    sock = context.wrap_socket(raw, server_hostname=site.site.dicom_host)
    assert isinstance(sock, ssl.SSLSocket)
    sock.sendall(_pynetdicom_request(roles=False, ct_syntaxes=(ExplicitVRLittleEndian,)))
    kind, length = ul.pdu_header(_recv_exactly(sock, 6))
    assert kind == ul.ASSOCIATE_AC
    _recv_exactly(sock, length)
    waited = _silent_in_a_data_set(site, sock, 1, short_network_timeout)
    assert short_network_timeout * 0.9 <= waited < short_network_timeout + 3
    assert direct_serves == ["STORESCU"]


def test_a_refusal_is_audited_even_when_its_response_cannot_be_sent(start, direct_serves, monkeypatch):
    # The outcome is reported after the response goes out; a connection lost on the response must
    # not lose the refusal's audit record.
    site = start()
    sent_ok = storage_path._sendall

    def fail_on_responses(sock, data):
        if bytes(data[:1]) == bytes([ul.P_DATA_TF]):
            raise ConnectionResetError("peer gone")
        sent_ok(sock, data)

    monkeypatch.setattr(storage_path, "_sendall", fail_on_responses)
    sock, context_id = _raw_association(site)
    named, sent = make_instance(), make_instance()
    _send_store(sock, context_id, sent, named_uid=named.SOPInstanceUID)
    deadline = time.monotonic() + 10
    while not site.audited("does not match") and time.monotonic() < deadline:
        time.sleep(0.05)
    sock.close()
    assert site.audited("does not match")
    assert site.stored() == []


def _temp_files(site: Site) -> list[Path]:
    return sorted((site.blobs.root / "tmp").iterdir())


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_next_stores_temp_file_is_made_after_a_response_and_none_outlives_the_association(start, direct_serves):
    site = start()
    sock, context_id = _raw_association(site)
    first, second = make_instance(), make_instance()
    for ds in (first, second):
        assert _store(sock, context_id, ds) == 0x0000
        # Made for the C-STORE to come, empty until that one's data set arrives.
        assert _wait_for(lambda: len(_temp_files(site)) == 1)
        (spare,) = _temp_files(site)
        assert spare.stat().st_size == 0
        if ds is first:
            made_after_first = spare
    # The second C-STORE was written into the temp file made after the first response.
    assert not made_after_first.exists()
    assert sorted(e["instance"]["sop_instance_uid"] for e in site.stored()) == sorted(
        [first.SOPInstanceUID, second.SOPInstanceUID])
    sock.close()  # gone without a release: the spare goes with the association
    assert _wait_for(lambda: not _temp_files(site))


def test_a_store_that_cannot_make_a_temp_file_ahead_still_stores(start, direct_serves, monkeypatch):
    site = start()

    def full(self):
        raise BlobStoreError(28, "cannot create a temp file: No space left on device")

    monkeypatch.setattr(BlobStore, "spare", full)
    sock, context_id = _raw_association(site)
    for ds in (make_instance(), make_instance()):
        assert _store(sock, context_id, ds) == 0x0000
    _release(sock)
    assert len(site.stored()) == 2
    assert not _temp_files(site)


def test_a_stores_audit_record_is_held_before_its_response_is_sent(start, direct_serves, monkeypatch):
    # A receiver killed right after answering must leave the acknowledged store's record in its spool.
    site = start()
    order: list[str] = []
    hold, sent_ok = site.ingestor.audit.hold, storage_path._sendall

    def held(*args, **kwargs):
        order.append("held")
        return hold(*args, **kwargs)

    def send(sock, data):
        if bytes(data[:1]) == bytes([ul.P_DATA_TF]):
            order.append("response")
        sent_ok(sock, data)

    monkeypatch.setattr(site.ingestor.audit, "hold", held)
    monkeypatch.setattr(storage_path, "_sendall", send)
    sock, context_id = _raw_association(site)
    _send_store(sock, context_id, make_instance())
    deadline = time.monotonic() + 10
    while "response" not in order and time.monotonic() < deadline:
        time.sleep(0.01)
    sock.close()
    assert len(site.stored()) == 1
    assert order[:2] == ["held", "response"]

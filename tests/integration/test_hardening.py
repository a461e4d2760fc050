"""Abuse of a running site: connections that hold a port without using it cannot starve real peers,
requests that cannot be decoded get a status and an audit record rather than an A-ABORT, and values too
long to index are refused rather than clipped."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, build_context
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicomgrid import schemas
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.dimse import SiteAE
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool
from tests.dicom_samples import make_instance, to_part10
from tests.grid import free_port, wait_for, bearer, web

pytestmark = [pytest.mark.cluster]

IDLE_SOCKETS = 200
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@contextmanager
def idle_sockets(host: str, port: int, n: int = IDLE_SOCKETS) -> Iterator[list[socket.socket]]:
    """``n`` TCP connections to ``host:port`` that never send a byte."""
    sockets = []
    try:
        for _ in range(n):
            sockets.append(socket.create_connection((host, port), timeout=5))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset), without blocking."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def wait_all_closed(sockets: list[socket.socket], timeout: float) -> float:
    """Seconds until the server closed every socket; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if all(closed_by_server(s) for s in sockets):
            return time.monotonic() - started
        time.sleep(0.1)
    still_open = sum(not closed_by_server(s) for s in sockets)
    raise AssertionError(f"{still_open} of {len(sockets)} connections still open after {timeout}s")


class Dribbler(threading.Thread):
    """Starts a PDU (an A-ASSOCIATE-RQ header announcing 4 KiB) and then sends one byte every 0.3 s,
    as a slow-loris attacker does, until the server closes the connection."""

    def __init__(self, host: str, port: int, head: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.sendall(head)
        self.closed_after: float | None = None
        self._opened = time.monotonic()

    def run(self) -> None:
        while time.monotonic() - self._opened < 120:
            try:
                self.sock.sendall(b"\x00")
            except OSError:
                break
            if closed_by_server(self.sock):
                break
            time.sleep(0.3)
        self.closed_after = time.monotonic() - self._opened
        self.sock.close()


def run_timed(argv: list[str], timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run DCMTK's ``argv[0]``; return how it ended and how long it took."""
    tool, *args = argv
    started = time.monotonic()
    done = subprocess.run([require_dcmtk_tool(tool), *args], capture_output=True, text=True, env=DCMTK_ENV,
                          timeout=timeout)
    return done, time.monotonic() - started


def associate_all(site):
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = [build_context(uid) for uid in (
        CTImageStorage, Verification, StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove)]
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established
    return assoc


# -- idle and slow connections -------------------------------------------------------------------


def test_idle_and_slow_sockets_cannot_starve_the_dicom_port(grid, tmp_path: Path):
    site = grid.site("A")
    limits = grid.config.connections
    host, port = site.dicom_host, str(site.dicom_port)
    path = tmp_path / "one.dcm"
    path.write_bytes(to_part10(make_instance()))
    dribbler = Dribbler(site.dicom_host, site.dicom_port, struct.pack(">BBL", 0x01, 0x00, 4096) + b"\x00\x01")
    with idle_sockets(site.dicom_host, site.dicom_port) as idle:
        dribbler.start()
        time.sleep(0.5)
        echo, echo_s = run_timed(["echoscu", "-aec", site.ae_title, host, port])
        store, store_s = run_timed(["storescu", "-aec", site.ae_title, host, port, str(path)])
        print(f"with {len(idle)} idle sockets and a slow sender: echoscu {echo_s:.2f}s, storescu {store_s:.2f}s")
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert store.returncode == 0, store.stdout + store.stderr
        assert echo_s < 3 and store_s < 3
        # At most max_pending_per_peer of them are still held: older ones made room for newer ones.
        assert sum(not closed_by_server(s) for s in idle) <= limits.max_pending_per_peer
        # The rest are dropped once the association-request timeout passes, counted from accept.
        closed_s = wait_all_closed(idle, limits.request_timeout_s + 3)
        print(f"idle sockets all closed by the receiver {closed_s:.1f}s later")
    dribbler.join(limits.request_timeout_s + 5)
    assert dribbler.closed_after is not None and dribbler.closed_after < limits.request_timeout_s + 2, (
        "a sender dribbling bytes must not stretch the association-request timeout"
    )


def test_idle_and_slow_sockets_cannot_starve_the_http_port(grid):
    site = grid.site("B")
    limits = grid.config.connections
    base = f"http://{site.http_host}:{site.http_port}"
    dribbler = Dribbler(site.http_host, site.http_port, b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\n")
    with idle_sockets(site.http_host, site.http_port) as idle:
        dribbler.start()
        time.sleep(0.5)
        started = time.monotonic()
        with httpx.Client(timeout=10, headers=bearer(grid.config)) as client:
            assert client.get(f"{base}/dicomweb/studies", params={"PatientID": "NOBODY-HERE"}).status_code == 200
            body = (b"--B\r\nContent-Type: application/dicom\r\n\r\n" + to_part10(make_instance()) + b"\r\n--B--\r\n")
            stow = client.post(f"{base}/dicomweb/studies", content=body,
                               headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
        elapsed = time.monotonic() - started
        print(f"with {len(idle)} idle sockets and a slow sender: QIDO-RS + STOW-RS {elapsed:.2f}s")
        assert stow.status_code == 200, stow.text
        assert elapsed < 3
        assert sum(not closed_by_server(s) for s in idle) <= limits.max_pending_per_peer
        closed_s = wait_all_closed(idle, limits.request_timeout_s + 3)
        print(f"idle sockets all closed by the HTTP service {closed_s:.1f}s later")
    dribbler.join(limits.request_timeout_s + 5)
    assert dribbler.closed_after is not None and dribbler.closed_after < limits.request_timeout_s + 2


def test_the_association_limit_counts_negotiated_associations_only(grid, taps, publishers, pynetdicom_settings):
    """A receiver allowing 2 associations: 50 idle sockets do not use them up; a third association is
    rejected (transient, local limit exceeded) and audited, and admitted once one is released."""
    site = grid.site("A").model_copy(update={"dicom_port": free_port(), "dicom_tls_port": free_port()})
    limits = grid.config.connections.model_copy(update={"max_associations": 2, "max_pending_per_peer": 64})
    config = grid.config.model_copy(update={"sites": [site, grid.site("B")], "connections": limits})
    publisher = publishers(config.kafka, "test-association-limit")
    tap = taps(schemas.TOPIC_AUDIT)
    server = SiteAE(config, "A", [], AuditTrail("A", publisher)).serve(
        spool_dir=grid.config.site_storage("A") / "incoming", block=False)
    try:
        with idle_sockets(site.dicom_host, site.dicom_port, 50):
            first, second = associate_all(site), associate_all(site)
            third = AE(ae_title="ECHOSCU")
            third.add_requested_context(Verification)
            rejected = third.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
            assert rejected.is_rejected
            assert (rejected.acceptor.primitive.result, rejected.acceptor.primitive.result_source,
                    rejected.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)
            first.release()
            admitted = associate_all(site)
            assert admitted.send_c_echo().Status == 0x0000
            admitted.release()
            second.release()
        alert = tap.collect(lambda seen: any("local limit of 2" in a["outcome_description"] for a in seen))
        assert any(a["event"] == "Security Alert" for a in alert if "local limit" in a["outcome_description"])
    finally:
        server.shutdown()
        server.server_close()


# -- requests the site cannot decode ----------------------------------------------------------------


LONG_UID = "1.2.826.0.1.3680043.8.498." + "1" * 44  # 70 characters
UNDECODABLE = b"\xff" * 11  # not even an element header


@pytest.fixture
def lax_scu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's pynetdicom sends what its own checks refuse, as a faulty PACS would."""
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
    monkeypatch.setitem(_config.VALIDATORS, "AE", lambda value: (True, ""))


def exchange(assoc, request, abstract_syntax: str) -> list:
    """Send a hand-made request primitive and collect the responses up to the final one (pynetdicom's
    send_* methods build, and check, their own)."""
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == abstract_syntax)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        responses = []
        while True:
            _, response = assoc.dimse.get_msg(block=True)
            if response is None:
                return responses
            responses.append(response)
            if response.Status not in (0xFF00, 0xFF01):
                return responses
    finally:
        assoc._reactor_checkpoint.set()


def query_request(identifier: bytes, cls=C_FIND, model: str = StudyRootQueryRetrieveInformationModelFind):
    request = cls()
    request.MessageID = 5
    request.AffectedSOPClassUID = model
    request.Identifier = BytesIO(identifier)
    return request


def study_query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = "1.2.3.4"
    return ds


def refusals(tap, n: int) -> list[dict]:
    """Audit records of refused requests, once ``n`` have arrived."""

    def mine(seen):
        return [a for a in seen if "refused" in a["outcome_description"] or "aborted" in a["outcome_description"]]

    found = mine(tap.collect(lambda seen: len(mine(seen)) >= n, timeout=20))
    for audit in found:
        schemas.validate_event(schemas.TOPIC_AUDIT, audit)
    return found


def test_undecodable_command_fields_get_a_status_and_an_audit_record(grid, taps, lax_scu):
    tap = taps(schemas.TOPIC_AUDIT)
    assoc = associate_all(grid.site("A"))
    try:
        ds = make_instance(sop_uid=LONG_UID)
        store = assoc.send_c_store(ds)
        assert store.Status == 0xC001, "an over-long Affected SOP Instance UID is a bad UID, not an A-ABORT"
        assert store.ErrorComment == "AffectedSOPInstanceUID longer than 64 characters"
        assert store.OffendingElement == 0x00001000

        find = query_request(encode(study_query(), True, True))
        find._priority = 7  # Priority is 0, 1 or 2
        (final,) = exchange(assoc, find, StudyRootQueryRetrieveInformationModelFind)
        assert final.Status == 0xC000 and "Priority" in final.ErrorComment

        moves = list(assoc.send_c_move(study_query(), "DESTINATION_TOO_LONG", StudyRootQueryRetrieveInformationModelMove))
        assert [status.Status for status, _ in moves] == [0xA801]

        # The association is still good for the next, well-formed, request.
        assert assoc.send_c_store(make_instance()).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    audits = {a["outcome_description"] for a in refusals(tap, 3)}
    assert "C-STORE refused with 0xC001: AffectedSOPInstanceUID longer than 64 characters" in audits
    assert any(a.startswith("C-FIND refused with 0xC000: Priority") for a in audits)
    assert "C-MOVE refused with 0xA801: MoveDestination longer than 16 characters" in audits
    assert not any("DESTINATION_TOO_LONG" in a for a in audits), "refusals name fields, never values"


def test_undecodable_identifiers_get_a_failure_status_and_an_audit_record(grid, taps):
    tap = taps(schemas.TOPIC_AUDIT)
    assoc = associate_all(grid.site("A"))
    try:
        (find,) = exchange(assoc, query_request(UNDECODABLE), StudyRootQueryRetrieveInformationModelFind)
        get = exchange(assoc, query_request(UNDECODABLE, C_GET, StudyRootQueryRetrieveInformationModelGet),
                       StudyRootQueryRetrieveInformationModelGet)
        move_request = query_request(UNDECODABLE, C_MOVE, StudyRootQueryRetrieveInformationModelMove)
        move_request.MoveDestination = "STORESCP"
        move = exchange(assoc, move_request, StudyRootQueryRetrieveInformationModelMove)
        assert find.Status == 0xC000 and "cannot be decoded" in find.ErrorComment
        assert get[-1].Status == 0xA900 and "cannot be decoded" in get[-1].ErrorComment
        assert move[-1].Status >> 12 == 0xC  # unable to process
        assert assoc.is_established
    finally:
        assoc.release()
    described = [a["outcome_description"] for a in tap.collect(
        lambda seen: sum("cannot be decoded" in a["outcome_description"] for a in seen) >= 3, timeout=20)]
    for operation in ("C-FIND", "C-GET", "C-MOVE"):
        assert any(d.startswith(operation) and "cannot be decoded" in d for d in described), (operation, described)


def test_a_command_set_that_cannot_be_decoded_is_aborted_and_audited(grid, taps):
    tap = taps(schemas.TOPIC_AUDIT)
    assoc = associate_all(grid.site("A"))
    context = assoc.accepted_contexts[0].context_id
    # A P-DATA-TF PDU with one PDV: the last fragment (0x03) of a command set that is garbage.
    pdv = bytes([context, 0x03]) + UNDECODABLE
    item = struct.pack(">L", len(pdv)) + pdv
    assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0x00, len(item)) + item)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, "there is no Message ID to answer: A-ABORT is all the protocol allows"
    (audit,) = refusals(tap, 1)
    assert audit["event"] == "Security Alert" and "association aborted" in audit["outcome_description"]
    # The receiver serves the next PACS.
    retry = associate_all(grid.site("A"))
    assert retry.send_c_echo().Status == 0x0000
    retry.release()


# -- over-long indexed text ------------------------------------------------------------------------


def stow(site, *instances: bytes) -> httpx.Response:
    body = b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in instances)
    return web.post(f"http://{site.http_host}:{site.http_port}/dicomweb/studies", content=body + b"--B--\r\n",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}, timeout=30)


def test_indexed_text_over_1024_characters_is_refused_and_up_to_1024_served_whole(grid, taps, tmp_path: Path):
    site_a, site_b = grid.site("A"), grid.site("B")
    tap = taps()
    audit_tap = taps(schemas.TOPIC_AUDIT)
    study = generate_uid()
    at_limit = "Doe^" + "J" * 1020  # 1,024 characters
    over = make_instance(study_uid=study, patient_name=at_limit + "e")
    huge = make_instance(study_uid=study, patient_name="Doe^" + "J" * 9996)

    # A PACS (DCMTK storescu) sending a 10,000-character name is told why, not "success".
    path = tmp_path / "huge.dcm"
    path.write_bytes(to_part10(huge))
    sent, _ = run_timed(["storescu", "-d", "-aec", site_a.ae_title, site_a.dicom_host, str(site_a.dicom_port), str(path)])
    assert re.search(r"Status\s*:\s*0xc002", sent.stdout + sent.stderr, re.IGNORECASE), sent.stdout[-2000:]
    assert "indexed attribute too long: PatientName" in sent.stdout + sent.stderr
    # STOW-RS: 1,025 characters refused (FailureReason 0xC002), 1,024 stored.
    fits = make_instance(study_uid=study, patient_name=at_limit)
    response = stow(site_b, to_part10(over), to_part10(fits))
    assert response.status_code == 202, response.text
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [over.SOPInstanceUID] and failed["00081197"]["Value"] == [0xC002]

    audits = audit_tap.collect(lambda seen: sum("indexed attribute too long" in a["outcome_description"]
                                               for a in seen) >= 2)
    refused = [a for a in audits if "indexed attribute too long" in a["outcome_description"]]
    assert len(refused) == 2 and all("PatientName" in a["outcome_description"] for a in refused)
    assert not any("JJJJ" in json.dumps(a) for a in refused), "no patient data in audit records"
    # Nothing of the refused ones was announced; the one at the limit is served whole by QIDO-RS.
    events = tap.collect(lambda seen: any(e["instance"]["sop_instance_uid"] == fits.SOPInstanceUID for e in seen))
    assert {e["instance"]["sop_instance_uid"] for e in events} & {over.SOPInstanceUID, huge.SOPInstanceUID} == set()

    def served() -> list[dict]:
        found = web.get(f"http://{site_a.http_host}:{site_a.http_port}/dicomweb/studies",
                          params={"StudyInstanceUID": study}, timeout=10)
        return found.json() if found.status_code == 200 else []

    (found,) = wait_for(served, timeout=30)
    assert found["00100010"]["Value"] == [{"Alphabetic": at_limit}]
    assert found["00201208"]["Value"] == [1]  # NumberOfStudyRelatedInstances: only the one at the limit

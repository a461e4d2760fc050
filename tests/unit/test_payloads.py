"""Where retrieve bytes come from: local replica, else a verified copy from a peer (a real HTTP peer here).

Site B's payload endpoint runs in uvicorn on a free port; the index is a stand-in that lists replicas.
Also the pure parts of the retrieve services: identifier checks and Accept negotiation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from starlette.responses import Response
from starlette.routing import Route

from dicomgrid.consumers import payloads as payloads_module
from dicomgrid.consumers.payloads import Payloads
from dicomgrid.consumers.retrieve_scp import InvalidIdentifier, parse_identifier
from dicomgrid.consumers.wado import ANY_SYNTAX, accepted_syntaxes, accepts_json
from dicomgrid.core import blobstore as blobstore_module
from dicomgrid.core.audit import SERIOUS_FAILURE, SUCCESS
from dicomgrid.core.blobstore import PayloadCorrupt
from dicomgrid.core.transfer import PayloadUnavailable
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)
from tests.grid import free_port
from tests.unit.peer_sites import (
    FakeLedger,
    instance,
    PeerServer,
    TwoSites,
    corrupt,
    site_config,
    site_context,
)


def _read(payloads: Payloads, digest: str) -> bytes:
    return b"".join(payloads.open(instance(digest)))


def test_intact_local_copy_is_served_without_asking_peers(sites: TwoSites):
    data = os.urandom(300_000)
    digest = sites.put(sites.a, data)
    assert _read(Payloads(sites.a), digest) == data
    assert not sites.b.blobs.exists(digest)
    assert sites.a.audit.records == []


def test_missing_local_copy_is_fetched_verified_stored_and_audited(sites: TwoSites):
    data = os.urandom(2_500_000)
    digest = sites.put(sites.b, data)
    payloads = Payloads(sites.a)
    assert _read(payloads, digest) == data
    assert sites.a.blobs.verify(digest)  # the local replica is repaired, and the ledger knows
    assert sites.ledger.recorded == [("A", digest, len(data))]
    (repair,) = sites.a.audit.records
    assert repair["outcome"] == SUCCESS and ("payload", digest) in repair["objects"]
    assert "missing" in repair["description"] and "site B" in repair["description"]
    # The peer recorded the export.
    assert any(r["event"] == "DICOM Instances Transferred" for r in sites.b.audit.records)
    # Served locally from now on.
    assert payloads.local_path(instance(digest)) == sites.a.blobs.path(digest)
    assert len(sites.a.audit.records) == 1


def test_corrupt_local_copy_is_quarantined_and_replaced(sites: TwoSites):
    data = os.urandom(100_000)
    digest = sites.put(sites.a, data)
    sites.b.blobs.put_bytes(data)  # the peer holds a copy the ledger does not list yet
    corrupt(sites.a.blobs.path(digest))
    path = Payloads(sites.a).local_path(instance(digest))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert len(list((sites.a.blobs.root / "quarantine").iterdir())) == 1
    assert "corrupt" in sites.a.audit.records[-1]["description"]


def test_no_intact_copy_anywhere_is_unavailable(sites: TwoSites):
    data = os.urandom(10_000)
    digest = sites.put(sites.a, data)
    sites.put(sites.b, data)
    corrupt(sites.a.blobs.path(digest))
    corrupt(sites.b.blobs.path(digest))
    with pytest.raises(PayloadUnavailable):
        Payloads(sites.a).open(instance(digest))
    assert sites.a.audit.records[-1]["outcome"] == SERIOUS_FAILURE
    assert not sites.a.blobs.exists(digest)  # nothing wrong was stored


def test_large_payload_is_checked_while_streaming(sites: TwoSites, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(payloads_module, "VERIFY_FIRST_MAX_BYTES", 1000)
    monkeypatch.setattr(blobstore_module, "_CHUNK", 4096)
    data = os.urandom(50_000)
    digest = sites.put(sites.a, data)
    payloads = Payloads(sites.a)
    assert _read(payloads, digest) == data
    corrupt(sites.a.blobs.path(digest))
    with pytest.raises(PayloadCorrupt):
        _read(payloads, digest)
    assert not sites.a.blobs.exists(digest)  # moved aside, so the next request repairs it
    sites.b.blobs.put_bytes(data)
    assert _read(payloads, digest) == data


def test_peers_are_the_ledger_first_then_every_other_site(sites: TwoSites):
    payloads = Payloads(sites.a)
    assert [p.name for p in payloads.peers("0" * 64)] == ["B"]
    sites.ledger.copies["1" * 64] = ["A", "B", "GONE"]
    assert [p.name for p in payloads.peers("1" * 64)] == ["B"]


def test_payload_endpoint_checks_token_digest_and_presence(sites: TwoSites):
    digest = sites.put(sites.b, b"payload bytes")
    base = sites.url("")
    auth, get = sites.auth, sites.http.get
    assert get(base + digest).status_code == 401
    assert get(base + digest, headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
    assert get(base + "G" * 64, headers=auth).status_code == 400
    assert get(base + "not-a-digest", headers=auth).status_code == 400
    # An encoded path never reaches the handler: the route takes a single segment.
    assert get(base + "..%2F..%2Fetc%2Fpasswd", headers=auth).status_code == 404
    assert get(base + "0" * 64, headers=auth).status_code == 404
    response = get(base + digest, headers=auth)
    assert response.status_code == 200 and response.content == b"payload bytes"


def test_peer_with_wrong_bytes_is_not_trusted(tmp_path: Path):
    ledger = FakeLedger()
    config = site_config(tmp_path, {"A": free_port(), "B": free_port()})
    a, b = site_context(config, "A", ledger), site_context(config, "B", ledger)
    data = os.urandom(5000)
    digest = hashlib.sha256(data).hexdigest()
    ledger.copies[digest] = ["B"]

    async def lying_peer(request: Any) -> Response:
        return Response(data[:-1] + b"?", media_type="application/octet-stream")

    with PeerServer(b, [Route("/internal/payloads/{sha256}", lying_peer)]):
        with pytest.raises(PayloadUnavailable, match="do not match"):
            Payloads(a).open(instance(digest))
    assert not list(a.blobs.digests())
    assert not any((a.blobs.root / "tmp").iterdir())


# -- identifiers and content negotiation -------------------------------------------------------


def _identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
def test_retrieve_identifiers_follow_the_model():
    study_root, patient_root = StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelMove
    ok = parse_identifier(_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=["1.2.3", "1.2.4"]), study_root)
    assert ok.study_uids == ("1.2.3", "1.2.4") and ok.patient_id is None
    image = parse_identifier(
        _identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.3",
                    SOPInstanceUID=["1.4", "1.5"]), study_root)
    assert (image.study_uids, image.series_uids, image.sop_instance_uids) == (("1.2",), ("1.3",), ("1.4", "1.5"))
    patient = parse_identifier(_identifier(QueryRetrieveLevel="PATIENT", PatientID="PAT-1"), patient_root)
    assert patient.level == "PATIENT" and patient.patient_id == "PAT-1"

    bad = [
        (_identifier(QueryRetrieveLevel="FRAME", StudyInstanceUID="1.2"), study_root),
        (_identifier(QueryRetrieveLevel="PATIENT", PatientID="P"), study_root),
        (_identifier(StudyInstanceUID="1.2"), study_root),
        (_identifier(QueryRetrieveLevel="STUDY"), study_root),
        (_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="../../etc/passwd"), study_root),
        (_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1." + "9" * 80), study_root),
        (_identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=["1.2", "1.3"], SeriesInstanceUID="1.4"),
         study_root),
        (_identifier(QueryRetrieveLevel="PATIENT"), patient_root),
    ]
    for identifier, model in bad:
        with pytest.raises(InvalidIdentifier):
            parse_identifier(identifier, model)


def test_accept_negotiation():
    assert accepted_syntaxes(None) == {ANY_SYNTAX}
    assert accepted_syntaxes('multipart/related; type="application/dicom"') == {ANY_SYNTAX}
    assert accepted_syntaxes('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1') == {
        "1.2.840.10008.1.2.1"
    }
    assert accepted_syntaxes('multipart/related; type="application/octet-stream"') == set()
    assert accepted_syntaxes("image/jpeg, */*;q=0") == set()
    assert accepts_json("application/dicom+json") and accepts_json(None)
    assert not accepts_json('multipart/related; type="application/dicom+xml"')


def test_verified_bytes_reads_an_intact_copy_and_repairs_a_corrupt_one(sites: TwoSites):
    data = os.urandom(200_000)
    digest = sites.put(sites.a, data)
    sites.b.blobs.put_bytes(data)
    sites.ledger.copies[digest].append("B")
    payloads = Payloads(sites.a)
    assert payloads.verified_bytes(instance(digest)) == data
    assert payloads.verified_bytes(instance(digest), max_bytes=len(data) - 1) is None  # then streamed from the file

    corrupt(sites.a.blobs.path(digest))
    assert payloads.verified_bytes(instance(digest)) == data  # quarantined, fetched from B, stored
    assert len(list((sites.a.blobs.root / "quarantine").iterdir())) == 1
    assert sites.a.blobs.verify(digest)
    assert "corrupt" in sites.a.audit.records[-1]["description"]


def test_verified_bytes_of_a_payload_no_site_has_intact_raises(sites: TwoSites):
    data = os.urandom(1000)
    digest = sites.put(sites.a, data)
    corrupt(sites.a.blobs.path(digest))
    with pytest.raises(PayloadUnavailable):
        Payloads(sites.a).verified_bytes(instance(digest))
    assert not sites.a.blobs.exists(digest)  # moved aside, not served

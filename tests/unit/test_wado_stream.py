"""WADO-RS streaming of stored payloads: parts byte for byte as stored, a corrupt copy never completes a
response, and the audit record says what was sent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from dicomgrid.consumers import wado as wado_module
from dicomgrid.consumers.payloads import Payloads
from dicomgrid.consumers.wado import Wado
from dicomgrid.core.audit import SERIOUS_FAILURE, SUCCESS
from dicomgrid.core.index_reader import StoredInstance
from tests.grid import free_port
from tests.unit.peer_sites import FakeLedger, corrupt, site_config, site_context

STUDY = "1.2.826.0.1.3680043.8.498.7"
ACCEPT = {"Accept": 'multipart/related; type="application/dicom"'}


class FakeIndex:
    def __init__(self) -> None:
        self.items: list[StoredInstance] = []

    def find_instances(self, study: str, series: Any = None, sops: Any = ()) -> list[StoredInstance]:
        return [i for i in self.items if i.study_uid == study]

    def patients_of(self, uids: Any) -> dict[str, tuple[str | None, str | None]]:
        return {}


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(wado_module, "WRITE_BYTES", 64 * 1024)  # several pieces per response
    config = site_config(tmp_path, {"A": free_port()})
    site = site_context(config, "A", FakeLedger())
    index = FakeIndex()
    site.index = index  # type: ignore[assignment]
    payloads = {}
    for number, size in enumerate([100, 30_000, 70_000, 5, 150_000]):
        data = os.urandom(size)
        digest = site.blobs.put_bytes(data).sha256
        uid = f"{STUDY}.1.{number}"
        index.items.append(StoredInstance(STUDY, f"{STUDY}.1", uid, "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1",
                                          digest))
        payloads[uid] = data
    app = Starlette(routes=Wado(site, Payloads(site)).routes())
    with TestClient(app) as client:
        yield client, site, index, payloads


def _parts(response: Any) -> list[bytes]:
    boundary = response.headers["content-type"].split("boundary=")[1]
    parts = []
    for chunk in response.content.split(f"--{boundary}".encode())[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.startswith(b"Content-Length")))
        assert body[length:] == b"\r\n"
        parts.append(body[:length])
    return parts


def test_a_study_streams_every_part_as_stored_and_is_audited_once(served):
    client, site, index, payloads = served
    response = client.get(f"/dicomweb/studies/{STUDY}", headers=ACCEPT)
    assert response.status_code == 200
    assert _parts(response) == [payloads[i.sop_instance_uid] for i in index.items]
    records = [r for r in site.audit.records if r["event"] == "DICOM Instances Transferred"]
    assert len(records) == 1 and records[0]["outcome"] == SUCCESS
    assert "5 instance(s) sent" in records[0]["description"]


def test_a_corrupt_copy_in_the_middle_aborts_the_stream_and_is_moved_aside(served):
    client, site, index, payloads = served
    victim = index.items[2]
    corrupt(site.blobs.path(victim.sha256))
    with pytest.raises(Exception):
        client.get(f"/dicomweb/studies/{STUDY}", headers=ACCEPT)  # no peer has it: the response is cut short
    assert not site.blobs.exists(victim.sha256)
    assert len(list((site.blobs.root / "quarantine").iterdir())) == 1
    records = [r for r in site.audit.records if r["event"] == "DICOM Instances Transferred"]
    assert records[-1]["outcome"] == SERIOUS_FAILURE and "aborted after 2 of 5" in records[-1]["description"]


def test_a_corrupt_first_copy_without_a_peer_is_a_503(served):
    client, site, index, _ = served
    corrupt(site.blobs.path(index.items[0].sha256))
    response = client.get(f"/dicomweb/studies/{STUDY}", headers=ACCEPT)
    assert response.status_code == 503

"""STOW-RS limits over a real ingest path (in-memory broker): 413 with a reason, nothing stored, audited."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from dicomgrid import schemas
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.config import LimitsConfig
from dicomgrid.producers.ingest import Ingestor
from dicomgrid.producers.stow import stow
from tests.dicom_samples import make_instance, to_part10
from tests.unit.test_ingest import FakePublisher

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary=B'


def body(*parts: bytes) -> bytes:
    return b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts) + b"--B--\r\n"


@pytest.fixture
def site(tmp_path: Path):
    publisher = FakePublisher()
    blobs = BlobStore(tmp_path / "blobs", "A")
    ingestor = Ingestor("A", blobs, publisher, None, AuditTrail("A", publisher), max_instance_bytes=1 << 20)
    spool = tmp_path / "incoming"
    spool.mkdir()

    def client(limits: LimitsConfig):
        from starlette.testclient import TestClient

        async def store(request: Request):
            return await stow(request, ingestor, spool, ingestor.max_instance_bytes, limits)

        async def root(request: Request):
            return None

        return TestClient(Starlette(routes=[Route("/dicomweb", root, name="dicomweb_root"),
                                            Route("/dicomweb/studies", store, methods=["POST"])]))

    return client, publisher, spool


def audits(publisher: FakePublisher) -> list[str]:
    return [a["outcome_description"] for a in publisher.of(schemas.TOPIC_AUDIT)]


def test_a_body_over_the_limit_is_refused_with_413_and_nothing_is_stored(site):
    client, publisher, spool = site
    one = to_part10(make_instance())
    http = client(LimitsConfig(stow_max_request_bytes=len(one) + 200))
    # Declared too large: refused before the body is read.
    response = http.post("/dicomweb/studies", content=body(one, one), headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 413 and "larger than" in response.json()["error"]
    assert response.headers["connection"] == "close"

    # Chunked (no Content-Length): refused once the body passes the limit; the first part, complete by
    # then, is not stored either.
    def chunks():
        payload = body(to_part10(make_instance()), to_part10(make_instance()))
        for i in range(0, len(payload), 4096):
            yield payload[i:i + 4096]

    response = http.post("/dicomweb/studies", content=chunks(), headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 413
    assert publisher.of(schemas.TOPIC_INSTANCE_STORED) == []
    assert list(spool.iterdir()) == []
    assert [d for d in audits(publisher) if d.startswith("STOW-RS refused with 413")] and len(audits(publisher)) == 2
    # The service goes on: a request within the limit is stored.
    response = http.post("/dicomweb/studies", content=body(one), headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 200, response.text
    assert len(publisher.of(schemas.TOPIC_INSTANCE_STORED)) == 1


def test_more_parts_than_allowed_is_refused_with_413(site):
    client, publisher, _ = site
    http = client(LimitsConfig(stow_max_parts=2))
    parts = [to_part10(make_instance()) for _ in range(3)]
    response = http.post("/dicomweb/studies", content=body(*parts), headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 413 and "more than 2 parts" in response.json()["error"]
    assert publisher.of(schemas.TOPIC_INSTANCE_STORED) == []
    response = http.post("/dicomweb/studies", content=body(*parts[:2]), headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 200
    assert len(publisher.of(schemas.TOPIC_INSTANCE_STORED)) == 2

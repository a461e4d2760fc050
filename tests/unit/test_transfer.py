"""Payload transfer between sites: byte ranges, verification before the last byte, resumed transfers.

Site B's endpoint is real (uvicorn on a free port); the ledger and audit trail are stand-ins.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from dicomgrid.core import transfer as transfer_module
from dicomgrid.core.blobstore import BlobBusy, PayloadCorrupt
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS
from dicomgrid.core.tls import http_verify
from dicomgrid.core.transfer import PayloadTransfer, PayloadUnavailable, Throttle
from tests.unit.peer_sites import FakeLedger, PeerServer, TwoSites, corrupt, site_config, site_context
from tests.grid import free_port, wait_for


def test_byte_ranges_are_served_as_206_and_bad_ones_as_416(sites: TwoSites):
    data = os.urandom(3_000_000)
    digest = sites.put(sites.b, data)
    response = sites.http.get(sites.url(digest), headers={**sites.auth, "Range": "bytes=1000000-"})
    assert response.status_code == 206 and response.content == data[1_000_000:]
    assert response.headers["content-range"] == f"bytes 1000000-{len(data) - 1}/{len(data)}"
    response = sites.http.get(sites.url(digest), headers={**sites.auth, "Range": "bytes=10-19"})
    assert response.status_code == 206 and response.content == data[10:20]
    for bad in (f"bytes={len(data)}-", "bytes=5-2", "bytes=0-1,5-6", "items=0-"):
        response = sites.http.get(sites.url(digest), headers={**sites.auth, "Range": bad})
        assert response.status_code == 416 and response.headers["content-range"] == f"bytes */{len(data)}"
    # Every successful response was audited once its bytes had gone.
    sent = [r for r in sites.b.audit.records if r["outcome"] == 0]
    assert len(sent) == 2 and all(("payload", digest) in r["objects"] for r in sent)


@pytest.mark.parametrize("where", [100, 2_999_990])  # early, and inside the last chunk
def test_a_corrupt_copy_never_goes_out_whole(sites: TwoSites, where: int):
    data = os.urandom(3_000_000)
    digest = sites.put(sites.b, data)
    path = sites.b.blobs.path(digest)
    os.chmod(path, 0o644)
    damaged = bytearray(data)
    damaged[where] ^= 0xFF
    path.write_bytes(bytes(damaged))
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        with sites.http.stream("GET", sites.url(digest), headers=sites.auth) as response:
            assert response.headers["content-length"] == str(len(data))
            for chunk in response.iter_bytes():
                received += chunk
    assert len(received) < len(data)
    assert not sites.b.blobs.exists(digest)  # moved aside: the next request repairs it
    assert sites.b.audit.records[-1]["outcome"] == 8


def test_a_cut_transfer_resumes_from_the_bytes_already_written(tmp_path):
    ledger = FakeLedger()
    config = site_config(tmp_path, {"A": free_port(), "B": free_port()})
    a, b = site_context(config, "A", ledger), site_context(config, "B", ledger)
    data = os.urandom(2_500_000)
    digest = hashlib.sha256(data).hexdigest()
    ranges: list[str | None] = []

    async def cutting_peer(request: Request) -> Response:
        ranges.append(request.headers.get("range"))
        if len(ranges) == 1:
            async def half() -> Any:  # promises every byte, sends about half, then drops the connection
                yield data[:1_200_000]
                raise ConnectionResetError("cut")

            return StreamingResponse(half(), headers={"Content-Length": str(len(data))})
        start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
        return Response(data[start:], status_code=206, headers={"Content-Range": f"bytes {start}-/{len(data)}"})

    with PeerServer(b, [Route("/internal/payloads/{sha256}", cutting_peer)]):
        blob = PayloadTransfer(a).fetch(config.site("B"), digest)
    assert blob.sha256 == digest and a.blobs.path(digest).read_bytes() == data
    assert ranges[0] is None and ranges[1] == "bytes=1200000-"


def test_a_resumable_transfer_continues_after_a_crash_and_restarts_from_wrong_bytes(sites: TwoSites):
    data = os.urandom(2_000_000)
    digest = sites.put(sites.b, data)
    transfer = PayloadTransfer(sites.a)
    # What a killed worker left: the first 700,000 bytes, in the temp file named by the digest.
    partial = sites.a.blobs.root / "tmp" / f"{digest}.resume"
    partial.write_bytes(data[:700_000])
    assert transfer.fetch(sites.b.site, digest, resumable=True).sha256 == digest
    assert sites.a.blobs.verify(digest) and not partial.exists()
    served = [r for r in sites.b.audit.records if r["outcome"] == 0]
    assert served[-1]["objects"][0][1] == digest
    # A leftover that is not a prefix of the payload is found out by the digest and thrown away.
    sites.a.blobs.quarantine(digest)
    partial.write_bytes(b"\x00" * 700_000)
    with pytest.raises(PayloadCorrupt):
        transfer.fetch(sites.b.site, digest, resumable=True)
    assert not partial.exists() and not sites.a.blobs.exists(digest)
    assert transfer.fetch(sites.b.site, digest, resumable=True).sha256 == digest


def test_one_resumable_writer_per_payload(sites: TwoSites):
    digest = "ab" * 32
    with sites.a.blobs.writer(resume=digest) as first:
        first.write(b"some bytes")
        with pytest.raises(BlobBusy):
            with sites.a.blobs.writer(resume=digest):
                pass
    # The aborted resumable writer kept its bytes for the next attempt.
    with sites.a.blobs.writer(resume=digest) as again:
        assert again.size == len(b"some bytes")
        again.discard()


def test_transfer_prefers_the_named_source_then_the_ledger(sites: TwoSites):
    transfer = PayloadTransfer(sites.a)
    corrupt_digest = sites.put(sites.b, b"x" * 1000)
    corrupt(sites.b.blobs.path(corrupt_digest))
    assert [p.name for p in transfer.peers(corrupt_digest, prefer=["B"])] == ["B"]
    with pytest.raises(transfer_module.PayloadUnavailable, match="B:"):
        transfer.fetch_from_any(corrupt_digest, prefer=["B"])


class _CountingLedger(FakeLedger):
    reads: int = 0

    def replicas(self, digest: str) -> list[Any]:
        self.reads += 1
        return super().replicas(digest)


def test_the_ledger_is_read_only_when_the_named_source_fails(tmp_path):
    ledger = _CountingLedger()
    config = site_config(tmp_path, {"A": free_port(), "B": free_port(), "C": free_port()})
    a, b, c = (site_context(config, name, ledger) for name in "ABC")
    data = os.urandom(5000)
    digest = b.blobs.put_bytes(data).sha256
    c.blobs.put_bytes(data)
    ledger.copies[digest] = ["C", "B"]
    with PeerServer(b), PeerServer(c):
        transfer = PayloadTransfer(a)
        peer, blob = transfer.fetch_from_any(digest, prefer=["B"])
        assert (peer.name, blob.sha256, ledger.reads) == ("B", digest, 0)
        # The named source has lost its copy: then the ledger says who else holds one.
        a.blobs.quarantine(digest)
        b.blobs.quarantine(digest)
        peer, _ = transfer.fetch_from_any(digest, prefer=["B"])
        assert (peer.name, ledger.reads) == ("C", 1)


def test_throttle_spaces_transfers_to_the_configured_rate(monkeypatch: pytest.MonkeyPatch):
    clock = {"now": 100.0}
    slept: list[float] = []
    monkeypatch.setattr(transfer_module.time, "monotonic", lambda: clock["now"])

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock["now"] += seconds

    monkeypatch.setattr(transfer_module.time, "sleep", sleep)
    throttle = Throttle(1_000_000)
    for _ in range(5):
        throttle.take(1_000_000)
    # The first second's budget is there at once; each further megabyte waits its second.
    assert slept == pytest.approx([1.0, 1.0, 1.0, 1.0])


def test_the_payloads_a_peer_fetched_whole_are_audited_in_one_record_and_a_resumed_one_at_once(sites: TwoSites):
    digests = [sites.put(sites.b, os.urandom(50_000 + n)) for n in range(3)]
    for digest in digests:
        assert sites.http.get(sites.url(digest), headers=sites.auth).status_code == 200
    ranged = sites.http.get(sites.url(digests[0]), headers={**sites.auth, "Range": "bytes=100-"})
    assert ranged.status_code == 206
    # The resumed transfer is audited on its own once its bytes have gone (just after the client has
    # them); the whole ones wait for their collected record.
    assert wait_for(lambda: sites.b.audit.recorded, timeout=10, interval=0.02)
    (resumed,) = sites.b.audit.recorded
    assert resumed["action"] == "R" and resumed["objects"] == [("payload", digests[0])]
    (collected,) = [r for r in sites.b.audit.records if r is not resumed]
    assert collected["action"] == "R" and collected["outcome"] == 0
    assert collected["description"] == "payloads sent to peer site A: 3 payloads"
    assert collected["objects"] == [("payload", digest) for digest in digests]


def test_a_small_corrupt_copy_is_refused_whole_moved_aside_and_audited(sites: TwoSites):
    """Up to WHOLE_BODY_BYTES a payload is checked before any byte goes out: a corrupt one is answered
    404 (no intact copy here), not a cut transfer, and the fetching site looks elsewhere."""
    data = os.urandom(40_000)
    digest = sites.put(sites.b, data)
    path = sites.b.blobs.path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    response = sites.http.get(sites.url(digest), headers=sites.auth)
    assert response.status_code == 404 and "corrupt" in response.json()["error"]
    assert not sites.b.blobs.exists(digest)
    assert sites.b.audit.records[-1]["outcome"] == SERIOUS_FAILURE
    assert sites.b.audit.records[-1]["objects"] == [("payload", digest)]
    with pytest.raises(PayloadUnavailable):
        PayloadTransfer(sites.a).fetch_from_any(digest, prefer=["B"])
    assert not sites.a.blobs.exists(digest)


def test_a_small_payload_is_served_whole_and_by_range(sites: TwoSites):
    data = os.urandom(40_000)
    digest = sites.put(sites.b, data)
    whole = sites.http.get(sites.url(digest), headers=sites.auth)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-length"] == str(len(data))
    part = sites.http.get(sites.url(digest), headers={**sites.auth, "Range": "bytes=30000-"})
    assert part.status_code == 206 and part.content == data[30_000:]
    assert part.headers["content-range"] == f"bytes 30000-{len(data) - 1}/{len(data)}"
    assert PayloadTransfer(sites.a).fetch(sites.b.site, digest).sha256 == digest
    assert sites.a.blobs.path(digest).read_bytes() == data


def test_a_peer_that_leaves_before_a_small_payload_is_sent_is_audited_and_the_next_is_served(
        sites: TwoSites, monkeypatch: pytest.MonkeyPatch):
    """A fetching site that gives up (its read timeout) while B is still reading the payload from its
    disk: nothing reaches it, so B must not audit a payload sent to it, and goes on serving the copy."""
    data = os.urandom(40_000)
    digest = sites.put(sites.b, data)
    reading, slow_disk = threading.Event(), threading.Event()
    open_if_present = sites.b.blobs.open_if_present

    def slow_open(wanted: str) -> Any:
        reading.set()
        assert slow_disk.wait(10), "the peer never left"
        return open_if_present(wanted)

    monkeypatch.setattr(sites.b.blobs, "open_if_present", slow_open)
    assert sites.server is not None
    connections = sites.server.server.server_state.connections
    with httpx.Client(verify=http_verify(sites.b.config), timeout=httpx.Timeout(10, read=0.5)) as leaving:
        with pytest.raises(httpx.ReadTimeout):
            leaving.get(sites.url(digest), headers=sites.auth)
    assert reading.is_set()
    # The body goes out only once B's event loop has seen the connection go.
    wait_for(lambda: not connections, timeout=10, interval=0.02)
    slow_disk.set()

    def failures() -> list[dict[str, Any]]:
        return [r for r in sites.b.audit.recorded if r["outcome"] != SUCCESS]

    (left,) = wait_for(failures, timeout=10, interval=0.02)
    assert left["outcome"] == MINOR_FAILURE and left["action"] == "R"
    assert left["description"] == "peer left before the payload was sent"
    assert left["objects"] == [("payload", digest)]

    again = sites.http.get(sites.url(digest), headers=sites.auth)
    assert again.status_code == 200 and again.content == data
    assert sites.b.blobs.verify(digest) and sites.b.blobs.path(digest).read_bytes() == data
    # Only the second request counts as a payload sent; it is audited once its bytes have gone, just
    # after the client has them.
    (sent,) = wait_for(lambda: [r for r in sites.b.audit.records if r["outcome"] == SUCCESS], timeout=10,
                       interval=0.02)
    assert sent["description"] == "payloads sent to peer site A: 1 payload"
    assert sent["objects"] == [("payload", digest)]
    assert failures() == [left]

"""Batch payload transfer (``POST /internal/payloads``): many small payloads in one response, each
verified before it is named, and every payload a batch could not bring reported for a fetch of its own.

Site B's endpoint is real (uvicorn on a free port, HTTPS, the site's token check); the ledger and audit
trail are stand-ins. A peer that breaks the frame format is a small Starlette route of the test's own.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from dicomgrid.core import payload_frames
from dicomgrid.core.audit import SERIOUS_FAILURE, SUCCESS
from dicomgrid.core.blobstore import BlobRef
from dicomgrid.core.payload_frames import FrameError, FrameReader
from dicomgrid.core.transfer import BATCH_MAX, BATCH_PATH, PayloadTransfer
from tests.unit.peer_sites import FakeLedger, PeerServer, TwoSites, corrupt, site_config, site_context
from tests.grid import free_port


def _batch_url(sites: TwoSites) -> str:
    return sites.b.config.http_url("B") + BATCH_PATH


def test_a_batch_brings_each_small_payload_verified_and_says_why_it_did_not_bring_the_others(sites: TwoSites):
    small = [os.urandom(40_000 + n) for n in range(5)]
    digests = [sites.put(sites.b, data) for data in small]
    large = sites.put(sites.b, os.urandom(payload_frames.FRAME_MAX_BYTES + 1))
    damaged = sites.put(sites.b, os.urandom(30_000))
    corrupt(sites.b.blobs.path(damaged))
    unknown = hashlib.sha256(b"held by nobody").hexdigest()

    asked = [digests[0], large, digests[1], unknown, damaged, *digests[2:]]
    got = PayloadTransfer(sites.a).fetch_batch(sites.b.site, asked)

    assert set(got) == set(asked)
    for digest, data in zip(digests, small):
        assert isinstance(got[digest], BlobRef) and got[digest].site == "A"
        assert sites.a.blobs.path(digest).read_bytes() == data
    assert "413" in got[large] and not sites.a.blobs.exists(large)
    assert "404" in got[unknown] and "404" in got[damaged]
    assert not sites.a.blobs.exists(damaged)
    # B found its copy corrupt as it read it: moved aside (the next scrub or fetch repairs it), audited.
    assert not sites.b.blobs.exists(damaged) and sites.b.blobs.exists(large)
    records = sites.b.audit.records
    (refused,) = [r for r in records if r["outcome"] == SERIOUS_FAILURE]
    assert refused["objects"] == [("payload", damaged)]
    # The payloads that went are audited in one collected record, as single fetches are.
    (sent,) = [r for r in records if r["outcome"] == SUCCESS]
    assert sent["action"] == "R" and sent["objects"] == [("payload", d) for d in digests]


def test_a_batch_request_needs_the_replicate_scope_and_a_list_of_digests(sites: TwoSites):
    digest = sites.put(sites.b, os.urandom(1000))
    url = _batch_url(sites)
    assert sites.http.post(url, json={"sha256": [digest]}).status_code == 401
    for body in ({"sha256": []}, {"sha256": ["not-a-digest"]}, {"sha256": digest}, {"digests": [digest]},
                 {"sha256": [digest] * (BATCH_MAX + 1)}):
        response = sites.http.post(url, json=body, headers=sites.auth)
        assert response.status_code == 400, body
    response = sites.http.post(url, content=b"{not json", headers=sites.auth)
    assert response.status_code == 400
    response = sites.http.post(url, json={"sha256": [digest]}, headers=sites.auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(payload_frames.MEDIA_TYPE)


def _peer_sending(tmp_path, body: bytes):
    """Site A, and a site B whose batch endpoint answers ``body`` whatever it is asked."""
    config = site_config(tmp_path, {"A": free_port(), "B": free_port()})
    ledger = FakeLedger()
    a, b = site_context(config, "A", ledger), site_context(config, "B", ledger)

    async def answer(request: Request) -> StreamingResponse:
        async def chunks():
            for start in range(0, len(body), 7000):
                yield body[start:start + 7000]
        return StreamingResponse(chunks(), media_type=payload_frames.MEDIA_TYPE)

    return a, b, PeerServer(b, [Route(BATCH_PATH, answer, methods=["POST"])])


def test_a_batch_cut_half_way_keeps_the_payloads_that_came_whole_and_reports_the_rest(tmp_path):
    data = [os.urandom(20_000 + n) for n in range(3)]
    digests = [hashlib.sha256(d).hexdigest() for d in data]
    body = payload_frames.encode(digests[0], 200, data[0]) + payload_frames.encode(digests[1], 200, data[1])[:-500]
    a, b, server = _peer_sending(tmp_path, body)
    with server:
        got = PayloadTransfer(a).fetch_batch(b.site, digests)
    assert isinstance(got[digests[0]], BlobRef) and a.blobs.path(digests[0]).read_bytes() == data[0]
    assert isinstance(got[digests[1]], str) and isinstance(got[digests[2]], str)
    assert not a.blobs.exists(digests[1]) and not a.blobs.exists(digests[2])
    assert list(a.blobs.digests()) == [digests[0]]


def test_bytes_that_do_not_match_their_digest_are_never_named_and_the_next_frame_still_counts(tmp_path):
    good, bad = os.urandom(10_000), os.urandom(10_000)
    digests = [hashlib.sha256(bad).hexdigest(), hashlib.sha256(good).hexdigest()]
    tampered = bytes([bad[0] ^ 0xFF]) + bad[1:]
    body = payload_frames.encode(digests[0], 200, tampered) + payload_frames.encode(digests[1], 200, good)
    a, b, server = _peer_sending(tmp_path, body)
    with server:
        got = PayloadTransfer(a).fetch_batch(b.site, digests)
    assert "do not match" in got[digests[0]] and not a.blobs.exists(digests[0])
    assert isinstance(got[digests[1]], BlobRef) and a.blobs.path(digests[1]).read_bytes() == good


def test_a_peer_that_frames_payloads_not_asked_for_is_not_trusted(tmp_path):
    asked = [hashlib.sha256(b"one").hexdigest(), hashlib.sha256(b"two").hexdigest()]
    other = os.urandom(5000)
    body = payload_frames.encode(hashlib.sha256(other).hexdigest(), 200, other)
    a, b, server = _peer_sending(tmp_path, body)
    with server:
        got = PayloadTransfer(a).fetch_batch(b.site, asked)
    assert all(isinstance(got[d], str) for d in asked)
    assert list(a.blobs.digests()) == []


@pytest.mark.parametrize("body, why", [
    (payload_frames.encode("b" * 64, 200, b"x"), "not asked for"),
    (b"[1, 2]\n", "not an object"),
    (b"{\"sha256\": \"" + b"a" * 64 + b"\", \"status\": 200, \"size\": \"9\"}\n", "integer"),
    (b"{\"sha256\": \"" + b"a" * 64 + b"\", \"status\": 404, \"size\": 3}\nabc", "only a 200 frame"),
    (b"{\"sha256\": \"" + b"a" * 64 + b"\", \"status\": 200, \"size\": " + str(2 << 20).encode() + b"}\n", "exceeds"),
    (b"x" * (payload_frames.HEADER_MAX_BYTES + 10), "too long"),
])
def test_frames_that_break_the_format_are_refused(body: bytes, why: str):
    reader = FrameReader(["a" * 64])
    with pytest.raises(FrameError, match=why):
        list(reader.feed(body))


def test_frames_split_anywhere_are_read_whole_in_order():
    payloads = [os.urandom(n) for n in (1, 3000, 70_000)]
    digests = [hashlib.sha256(p).hexdigest() for p in payloads]
    body = b"".join(payload_frames.encode(d, 200, p) for d, p in zip(digests, payloads))
    body += payload_frames.encode("c" * 64, 404, error="no local copy")
    reader = FrameReader([*digests, "c" * 64])
    frames = [f for start in range(0, len(body), 333) for f in reader.feed(body[start:start + 333])]
    reader.close()
    assert [f.body for f in frames[:3]] == payloads
    assert frames[3].status == 404 and frames[3].error == "no local copy" and not reader.pending
    cut = FrameReader(digests)
    list(cut.feed(body[:100]))
    with pytest.raises(FrameError, match="inside a frame"):
        cut.close()

"""Payload transfer between sites: the client that fetches a verified copy and the endpoint that serves one.

Every movement of payload bytes from one site to another goes through here: a retrieve that repairs a
missing or corrupt local copy (:mod:`dicomgrid.consumers.payloads`) and the replication worker
(:mod:`dicomgrid.processors.replicator`).

The endpoint is ``GET /internal/payloads/{sha256}`` on each site's HTTP port (HTTPS when ``tls.http``),
behind the site's token check: a request carries a token the asking site signed with its own key,
addressed to the site asked, scope ``replicate`` (:class:`~dicomgrid.core.tokens.PeerTokens`). A site
only ever serves its own local copy, checked as it streams, so a fetch never
cascades from site to site. The client writes what it receives straight into the local blob store while
hashing it, and a copy is named (committed) only when its SHA-256 matches.

Peers are tried in this order: the sites the ``replicas`` ledger lists for the digest, then every other
configured site, because a copy may exist that the ledger does not list yet (one fetched by an earlier
retrieve, or a replication still in flight).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from dicomgrid import schemas
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditObject, Participant
from dicomgrid.core.blobstore import BlobBusy, BlobRef, BlobStoreError, BlobWriter, PayloadCorrupt, PayloadReader
from dicomgrid.core.config import SiteConfig
from dicomgrid.core.events import CopyCause, InstanceRef, replica_stored
from dicomgrid.core.kafka import PublishError
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.tls import http_verify
from dicomgrid.core.tokens import PeerTokens, Principal
from dicomgrid.core.transfer_audit import TransferAudit, TransferAudits

log = get_logger(__name__)

DIGEST = re.compile(r"[0-9a-f]{64}")
PEER_PATH = "/internal/payloads/{sha256}"
# Resumes of one cut transfer before the peer counts as failed.
MAX_RESUMES = 3
# Payloads up to this size are read and checked whole before any byte goes out (see TransferEndpoint).
WHOLE_BODY_BYTES = 1 << 20
# What a cut connection looks like to the client: the response ended early or the peer went quiet.
_CUT_OFF = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout)
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class Throttle:
    """Caps the byte rate of every transfer that shares it (a token bucket of one second's bytes)."""

    def __init__(self, bytes_per_s: float) -> None:
        self._rate = bytes_per_s
        self._tokens = bytes_per_s
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate) - n
            self._at = now
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


class PayloadUnavailable(RuntimeError):
    """No intact copy of the payload could be found at any site asked."""


class PeerRefused(RuntimeError):
    """A peer answered, but not with the payload."""


class PayloadTransfer:
    """Fetches verified copies of payloads from other sites into this site's blob store."""

    def __init__(
        self,
        site: SiteContext,
        *,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 30.0,
        bandwidth_bytes_s: float | None = None,
    ) -> None:
        self.site = site
        # One pooled client for every fetch (httpx clients may be shared between threads). Peer traffic
        # stays inside the grid: proxy settings from the environment are not applied to it.
        self._http = httpx.Client(timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s), trust_env=False,
                                  verify=http_verify(site.config))
        self._tokens = PeerTokens(site.config, site.site.name)
        self._throttle = Throttle(bandwidth_bytes_s) if bandwidth_bytes_s else None

    def close(self) -> None:
        self._http.close()

    def peers(self, digest: str, prefer: Iterable[str] = ()) -> list[SiteConfig]:
        """Sites to ask for a payload: ``prefer``, then those the ledger lists, then every other site."""
        try:
            listed = [r.site for r in self.site.ledger.replicas(digest)]
        except Exception as exc:  # the ledger is advisory: without it, every site is asked
            log.warning("replica ledger unavailable; asking every site", sha256=digest, error=str(exc))
            listed = []
        configured = [s.name for s in self.site.config.sites]
        order = dict.fromkeys(name for name in [*prefer, *listed, *configured] if name in configured)
        order.pop(self.site.site.name, None)
        return [self.site.config.site(name) for name in order]

    def _candidates(self, digest: str, prefer: Iterable[str]) -> Iterator[SiteConfig]:
        """:meth:`peers` in order, but the ledger is read only once every ``prefer`` site has failed: a
        replication request names the site that received the payload, which nearly always has it, and
        a ledger read per transfer would cost every copy a Cassandra round trip for nothing."""
        configured = {s.name for s in self.site.config.sites}
        tried = {self.site.site.name}
        for name in dict.fromkeys(prefer):
            if name in configured and name not in tried:
                tried.add(name)
                yield self.site.config.site(name)
        for peer in self.peers(digest):
            if peer.name not in tried:
                tried.add(peer.name)
                yield peer

    def fetch_from_any(
        self, digest: str, prefer: Iterable[str] = (), *, resumable: bool = False
    ) -> tuple[SiteConfig, BlobRef]:
        """Fetch a verified copy from the first peer that has one; which peer, and the local copy.

        Raises :class:`PayloadUnavailable` naming every peer's failure when none had an intact copy.
        """
        errors = []
        for peer in self._candidates(digest, prefer):
            try:
                return peer, self.fetch(peer, digest, resumable=resumable)
            except BlobBusy:
                raise  # another transfer of this payload is under way here: not the peer's failure
            except (httpx.HTTPError, PayloadCorrupt, BlobStoreError, PeerRefused) as exc:
                errors.append(f"{peer.name}: {exc}")
                log.warning("payload fetch from peer failed", sha256=digest, peer=peer.name, error=str(exc))
        detail = "; ".join(errors) or "no other site configured"
        raise PayloadUnavailable(f"no intact copy of payload {digest} found at any peer ({detail})")

    def fetch(self, peer: SiteConfig, digest: str, *, resumable: bool = False) -> BlobRef:
        """Stream a peer's copy into the blob store, verifying it on the way.

        A transfer cut mid-stream is resumed from the bytes already written (``Range``), up to
        :data:`MAX_RESUMES` times. With ``resumable`` those bytes are kept in a temp file named by the
        digest, so a later call (after a crash of this process, too) resumes where this one stopped.
        """
        max_bytes = self.site.site.max_instance_bytes
        with self.site.blobs.writer(max_bytes=max_bytes, resume=digest if resumable else None) as writer:
            resumes = 0
            while True:
                offset = writer.size
                try:
                    self._stream_into(peer, digest, writer)
                    break
                except _CUT_OFF as exc:
                    if resumes >= MAX_RESUMES or writer.size == offset and resumes:
                        raise
                    resumes += 1
                    log.info("payload transfer cut; resuming", sha256=digest, peer=peer.name,
                             offset=writer.size, error=str(exc))
            if writer.hexdigest() != digest:
                writer.discard()
                raise PayloadCorrupt(f"{peer.name} sent bytes that do not match {digest}")
            return writer.commit()

    def _stream_into(self, peer: SiteConfig, digest: str, writer: BlobWriter) -> None:
        url = self.site.config.http_url(peer.name) + PEER_PATH.format(sha256=digest)
        headers = {"Authorization": f"Bearer {self._tokens.for_site(peer.name)}"}
        if writer.size:
            headers["Range"] = f"bytes={writer.size}-"
        with self._http.stream("GET", url, headers=headers) as response:
            if writer.size and response.status_code == 416:
                # What was kept is longer than the peer's copy: not a prefix of it.
                writer.restart()
                raise PeerRefused("resumed transfer longer than the payload; starting over")
            expected = 206 if writer.size else 200
            if response.status_code != expected:
                raise PeerRefused(f"HTTP {response.status_code}")
            # As received, not re-chunked: bytes buffered towards a full chunk would be lost if the
            # connection were cut, and the resume would fetch them again.
            for chunk in response.iter_bytes():
                if self._throttle is not None:
                    self._throttle.take(len(chunk))
                writer.write(chunk)


def record_copy(
    site: SiteContext,
    blob: BlobRef,
    source_site: str,
    instance: InstanceRef | None,
    *,
    cause: CopyCause,
    request_event_id: str | None = None,
) -> None:
    """Announce a copy this site just made (``dicom.replica.stored``), then record it in the ledger.

    The event goes first: a replication request redelivered after a crash in between finds no ledger
    row and announces the copy again (consumers are idempotent), rather than finding a row whose event
    was never sent. A copy made by a repair, a recovery or a scrub is recorded even when Kafka cannot
    take its event (the request that needs an exact event log is replication's, which retries). A copy
    of a payload whose instance is not known (a scrub walks payloads, not instances) is only recorded;
    the scrub announces it with its own finding.
    """
    if site.publisher is not None and instance is not None:
        event = replica_stored(blob, source_site, instance, cause=cause, request_event_id=request_event_id)
        try:
            site.publisher.publish_and_wait(schemas.TOPIC_REPLICA_STORED, blob.sha256, event)
        except PublishError as exc:
            if cause == "replication":
                raise
            log.warning("repaired copy not announced; it is in the ledger", sha256=blob.sha256, error=str(exc))
    site.ledger.record(blob)


def _peer_site(request: Request) -> str:
    """The site (or, for a user's token, the subject) a payload request came from."""
    principal: Principal | None = request.state.principal if hasattr(request.state, "principal") else None
    return (principal.site or principal.subject) if principal is not None else "unknown"


class _AuditedBody(Response):
    """A response whose transfer is audited once its bytes have gone, or the peer left first."""

    def __init__(self, body: bytes, status: int, headers: dict[str, str], done: Callable[[bool], None]) -> None:
        super().__init__(body, status_code=status, headers=headers, media_type="application/octet-stream")
        self._done = done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        sent = False
        try:
            # A server of ASGI HTTP spec < 2.4 (uvicorn) drops what is sent to a connection that is gone
            # without raising: only receive() tells that the peer left while the payload was read.
            if not await Request(scope, receive).is_disconnected():
                await super().__call__(scope, receive, send)
                sent = True
        finally:
            self._done(sent)


class TransferEndpoint:
    """Serves this site's local copies to peer sites."""

    def __init__(self, site: SiteContext) -> None:
        self.site = site
        # What each peer fetched in full, audited together (core.transfer_audit); by (site, host).
        self._sent_to = TransferAudits(self._collector)

    def routes(self) -> list[BaseRoute]:
        return [Route(PEER_PATH, self._serve, methods=["GET"])]

    def _collector(self, peer: Any) -> TransferAudit:
        peer_site, host = peer
        me = self.site.site
        return TransferAudit(self.site.audit,
                             [Participant(peer_site, True, None, host, "Destination"),
                              Participant(me.name, False, me.ae_title, None, "Source")],
                             f"payloads sent to peer site {peer_site}", action="R")

    async def _serve(self, request: Request) -> Response:
        """A peer fetches this site's local copy (never anyone else's), checked as it goes out.

        ``Range: bytes=N-`` (or ``N-M``) resumes a cut transfer: 206 with those bytes. The whole copy
        is hashed either way: up to :data:`WHOLE_BODY_BYTES` before the response, beyond it as it
        streams, the last bytes held back until it matches its digest.
        """
        digest = request.path_params["sha256"]
        if not DIGEST.fullmatch(digest):
            return JSONResponse({"error": "not a lowercase hex SHA-256 digest"}, status_code=400)
        fh = await run_in_threadpool(self.site.blobs.open_if_present, digest)
        if fh is None:
            return JSONResponse({"error": "no local copy"}, status_code=404)
        reader = PayloadReader(fh, digest, True, self.site.blobs.quarantine)
        start, end, status = 0, reader.size, 200
        if "range" in request.headers:
            match = _RANGE.fullmatch(request.headers["range"].strip())
            if match is None:
                reader.close()
                return JSONResponse({"error": "only one byte range (bytes=N- or bytes=N-M) is served"},
                                    status_code=416, headers={"Content-Range": f"bytes */{reader.size}"})
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, reader.size) if match.group(2) else reader.size
            if start >= end:
                reader.close()
                return JSONResponse({"error": "range not satisfiable"}, status_code=416,
                                    headers={"Content-Range": f"bytes */{reader.size}"})
            status = 206
        headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{reader.size}"
        if reader.size <= WHOLE_BODY_BYTES:
            return await self._whole(request, reader, start, end, status, headers)
        return StreamingResponse(
            self._sent(request, reader, start, end), status_code=status,
            media_type="application/octet-stream", headers=headers,
        )

    async def _whole(self, request: Request, reader: PayloadReader, start: int, end: int, status: int,
                     headers: dict[str, str]) -> Response:
        """A small payload, read and checked in one worker-thread call before any byte goes out.

        Streamed, a 40 KB CT slice cost a task of its own and a thread hand-off per chunk, most of
        what serving it took. Checked first, a corrupt copy is moved aside and answered 404, as the
        next request would be, instead of a cut transfer.
        """
        try:
            body = await run_in_threadpool(lambda: b"".join(reader.chunks(start, end)))
        except PayloadCorrupt:
            self._audit_sent(request, reader, start, 0, SERIOUS_FAILURE,
                             "local copy corrupt; transfer to peer site refused")
            return JSONResponse({"error": "local copy corrupt; moved aside"}, status_code=404)

        def done(sent: bool) -> None:
            if sent:
                self._audit_sent(request, reader, start, len(body), SUCCESS,
                                 f"payload sent to peer site {_peer_site(request)}")
            else:
                self._audit_sent(request, reader, start, 0, MINOR_FAILURE, "peer left before the payload was sent")

        return _AuditedBody(body, status, headers, done)

    def _sent(self, request: Request, reader: PayloadReader, start: int, end: int) -> Iterator[bytes]:
        """The bytes of the response; the transfer is audited once they have all gone (or failed)."""
        sent, outcome, description = 0, MINOR_FAILURE, "peer left before the payload was sent"
        try:
            for chunk in reader.chunks(start, end):
                yield chunk
                sent += len(chunk)
            outcome, description = SUCCESS, f"payload sent to peer site {_peer_site(request)}"
        except PayloadCorrupt:
            outcome, description = SERIOUS_FAILURE, "local copy corrupt; transfer to peer site aborted"
            raise
        finally:
            self._audit_sent(request, reader, start, sent, outcome, description)

    def _audit_sent(self, request: Request, reader: PayloadReader, start: int, sent: int, outcome: int,
                    description: str) -> None:
        peer_site = _peer_site(request)
        address = f"{request.client.host}:{request.client.port}" if request.client else None
        me = self.site.site
        payload = AuditObject("payload", reader.digest, {"size": reader.size, "bytes_sent": sent, "offset": start})
        if outcome == SUCCESS and start == 0 and sent == reader.size:
            # A whole payload sent: audited with the others this peer fetched (a resumed, partial or
            # failed transfer is audited at once, on its own).
            host = request.client.host if request.client else None
            self._sent_to[(peer_site, host)].add_payload(payload, description=description)
        else:
            self.site.audit.record(
                "R",
                "DICOM Instances Transferred",
                outcome,
                description,
                [Participant(peer_site, True, None, address, "Destination"),
                 Participant(me.name, False, me.ae_title, None, "Source")],
                [payload],
            )

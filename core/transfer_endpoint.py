"""The payload transfer endpoint: a site serves its own local copies to peer sites.

``GET /internal/payloads/{sha256}`` serves one payload (``Range`` resumes a cut transfer);
``POST /internal/payloads`` with ``{"sha256": [...]}`` serves up to :data:`BATCH_MAX` small ones in one
response (:mod:`dicomgrid.core.payload_frames`), so that a replication worker copying a stream of CT
slices pays one request, one token check and one response for many of them. Both sit behind the
site's token check (scope ``replicate``, :mod:`dicomgrid.http`) and check every copy against its
digest before it goes out; the client is :class:`~dicomgrid.core.transfer.PayloadTransfer`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from dicomgrid.core import payload_frames
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditObject, Participant
from dicomgrid.core.blobstore import PayloadCorrupt, PayloadReader
from dicomgrid.core.site import SiteContext
from dicomgrid.core.tokens import Principal
from dicomgrid.core.transfer import BATCH_MAX, BATCH_PATH, DIGEST, PEER_PATH, WHOLE_BODY_BYTES
from dicomgrid.core.transfer_audit import TransferAudit, TransferAudits

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
# Payloads of a batch read per worker-thread call (a thread hand-off each), at most 1 MiB apiece.
_READ_GROUP = 8


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
        return [Route(PEER_PATH, self._serve, methods=["GET"]), Route(BATCH_PATH, self._serve_batch, methods=["POST"])]

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

    async def _serve_batch(self, request: Request) -> Response:
        """A peer fetches several small local copies in one response (:mod:`dicomgrid.core.payload_frames`).

        Each copy is read and checked whole before its frame goes out: a corrupt one is moved aside
        and framed 404, as a request for it alone would be answered, and the others still go.
        """
        try:
            asked = (await request.json())["sha256"]
            ok = (isinstance(asked, list) and 0 < len(asked) <= BATCH_MAX
                  and all(isinstance(d, str) and DIGEST.fullmatch(d) for d in asked))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            return JSONResponse({"error": f'a JSON object {{"sha256": [...]}} of 1 to {BATCH_MAX} lowercase hex'
                                          " SHA-256 digests"}, status_code=400)
        return StreamingResponse(self._frames(request, list(dict.fromkeys(asked))),
                                 media_type=payload_frames.MEDIA_TYPE)

    async def _frames(self, request: Request, digests: list[str]) -> AsyncIterator[bytes]:
        peer_site = _peer_site(request)
        host = request.client.host if request.client else None
        for start in range(0, len(digests), _READ_GROUP):
            group = await run_in_threadpool(self._read_group, request, digests[start:start + _READ_GROUP])
            for digest, frame, size in group:
                yield frame
                if size is not None:
                    # Handed to the server once the next frame is asked for, as a streamed single
                    # payload is audited after its last chunk.
                    self._sent_to[(peer_site, host)].add_payload(
                        AuditObject("payload", digest, {"size": size, "bytes_sent": size, "offset": 0}),
                        description=f"payload sent to peer site {peer_site}")

    def _read_group(self, request: Request, digests: Sequence[str]) -> list[tuple[str, bytes, int | None]]:
        """The frames of ``digests``, with the size of each payload that goes (None: framed as not sent)."""
        out: list[tuple[str, bytes, int | None]] = []
        for digest in digests:
            fh = self.site.blobs.open_if_present(digest)
            if fh is None:
                out.append((digest, payload_frames.encode(digest, 404, error="no local copy"), None))
                continue
            reader = PayloadReader(fh, digest, True, self.site.blobs.quarantine)
            if reader.size > payload_frames.FRAME_MAX_BYTES:
                reader.close()
                out.append((digest, payload_frames.encode(digest, 413, error="larger than a batch carries"), None))
                continue
            try:
                body = b"".join(reader.chunks())
            except PayloadCorrupt:
                self._audit_sent(request, reader, 0, 0, SERIOUS_FAILURE, "local copy corrupt; transfer to peer site refused")
                out.append((digest, payload_frames.encode(digest, 404, error="local copy corrupt; moved aside"), None))
                continue
            out.append((digest, payload_frames.encode(digest, 200, body), len(body)))
        return out

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

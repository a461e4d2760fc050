"""Payload transfer between sites: the client that fetches a verified copy and the endpoint that serves one.

Every movement of payload bytes from one site to another goes through here: a retrieve that repairs a
missing or corrupt local copy (:mod:`dicomgrid.consumers.payloads`) and the replication worker
(:mod:`dicomgrid.processors.replicator`).

The endpoint is ``GET /internal/payloads/{sha256}`` on each site's HTTP port, guarded by the grid's
peer bearer token. A site only ever serves its own local copy, checked as it streams, so a fetch never
cascades from site to site. The client writes what it receives straight into the local blob store while
hashing it, and a copy is named (committed) only when its SHA-256 matches.

Peers are tried in this order: the sites the ``replicas`` ledger lists for the digest, then every other
configured site, because a copy may exist that the ledger does not list yet (one fetched by an earlier
retrieve, or a replication still in flight).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

import httpx
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from dicomgrid.core.audit import SUCCESS, AuditObject, Participant
from dicomgrid.core.blobstore import BlobRef, BlobStoreError, PayloadCorrupt, PayloadReader
from dicomgrid.core.config import SiteConfig
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext

log = get_logger(__name__)

DIGEST = re.compile(r"[0-9a-f]{64}")
CHUNK_BYTES = 1024 * 1024
PEER_PATH = "/internal/payloads/{sha256}"
SITE_HEADER = "X-Dicomgrid-Site"


class PayloadUnavailable(RuntimeError):
    """No intact copy of the payload could be found at any site asked."""


class PeerRefused(RuntimeError):
    """A peer answered, but not with the payload."""


class PayloadTransfer:
    """Fetches verified copies of payloads from other sites into this site's blob store."""

    def __init__(self, site: SiteContext, *, connect_timeout_s: float = 3.0, read_timeout_s: float = 30.0) -> None:
        self.site = site
        # One pooled client for every fetch (httpx clients may be shared between threads). Peer traffic
        # stays inside the grid: proxy settings from the environment are not applied to it.
        self._http = httpx.Client(timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s), trust_env=False)

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

    def fetch_from_any(self, digest: str, prefer: Iterable[str] = ()) -> tuple[SiteConfig, BlobRef]:
        """Fetch a verified copy from the first peer that has one; which peer, and the local copy.

        Raises :class:`PayloadUnavailable` naming every peer's failure when none had an intact copy.
        """
        errors = []
        for peer in self.peers(digest, prefer):
            try:
                return peer, self.fetch(peer, digest)
            except (httpx.HTTPError, PayloadCorrupt, BlobStoreError, PeerRefused) as exc:
                errors.append(f"{peer.name}: {exc}")
                log.warning("payload fetch from peer failed", sha256=digest, peer=peer.name, error=str(exc))
        detail = "; ".join(errors) or "no other site configured"
        raise PayloadUnavailable(f"no intact copy of payload {digest} found at any peer ({detail})")

    def fetch(self, peer: SiteConfig, digest: str) -> BlobRef:
        """Stream a peer's copy into the blob store, verifying it on the way."""
        url = f"http://{peer.http_host}:{peer.http_port}{PEER_PATH.format(sha256=digest)}"
        headers = {"Authorization": f"Bearer {self.site.config.security.peer_token}", SITE_HEADER: self.site.site.name}
        with self._http.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise PeerRefused(f"HTTP {response.status_code}")
            hasher = hashlib.sha256()
            with self.site.blobs.writer(max_bytes=self.site.site.max_instance_bytes) as writer:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    hasher.update(chunk)
                    writer.write(chunk)
                if hasher.hexdigest() != digest:
                    raise PayloadCorrupt(f"{peer.name} sent bytes that do not match {digest}")
                return writer.commit()


class TransferEndpoint:
    """Serves this site's local copies to peer sites."""

    def __init__(self, site: SiteContext) -> None:
        self.site = site

    def routes(self) -> list[BaseRoute]:
        return [Route(PEER_PATH, self._serve, methods=["GET"])]

    async def _serve(self, request: Request) -> Response:
        """A peer fetches this site's local copy (never anyone else's), checked as it streams."""
        if not self._authorized(request):
            return JSONResponse({"error": "missing or invalid bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        digest = request.path_params["sha256"]
        if not DIGEST.fullmatch(digest):
            return JSONResponse({"error": "not a lowercase hex SHA-256 digest"}, status_code=400)
        fh = await run_in_threadpool(self.site.blobs.open_if_present, digest)
        if fh is None:
            return JSONResponse({"error": "no local copy"}, status_code=404)
        reader = PayloadReader(fh, digest, True, self.site.blobs.quarantine)
        peer_site = request.headers.get(SITE_HEADER, "unknown")[:64]
        address = f"{request.client.host}:{request.client.port}" if request.client else None
        me = self.site.site
        self.site.audit.record(
            "R",
            "DICOM Instances Transferred",
            SUCCESS,
            f"payload sent to peer site {peer_site}",
            [Participant(peer_site, True, None, address, "Destination"),
             Participant(me.name, False, me.ae_title, None, "Source")],
            [AuditObject("payload", digest, {"size": reader.size})],
        )
        return StreamingResponse(
            reader, media_type="application/octet-stream", headers={"Content-Length": str(reader.size)}
        )

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = self.site.config.security.peer_token
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())

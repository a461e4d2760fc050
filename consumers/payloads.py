"""Where the bytes of every retrieve come from (C-GET, C-MOVE, WADO): one place, always verified.

An instance is served from the site's own replica when that copy is present and intact (its SHA-256
matches its name). When it is missing or corrupt, a verified copy is fetched from another site's payload
endpoint (``GET /internal/payloads/{sha256}``, bearer token), stored into the local blob store (which
repairs the local replica), and served from there. Each repair is logged and audited so that
replication can follow up.

Peers are tried in this order: the sites the ``replicas`` ledger lists for the digest, then every other
configured site, because a copy may exist that the ledger does not list yet (one fetched by an earlier
retrieve, or a replication still in flight). A peer only ever serves its own local copy, so a fetch never
cascades from site to site.

Verification costs a read of the payload. Payloads up to :data:`VERIFY_FIRST_MAX_BYTES` are hashed before
their first byte is served (then served from the same open file, from the page cache), so a corrupt local
copy can still be replaced by a peer's before anything goes out. Larger ones are hashed while they stream:
a mismatch then aborts the response (the receiver sees a truncated transfer, never a complete wrong one)
and moves the corrupt copy aside, so the next request repairs it. DIMSE senders always get a fully
verified file (:meth:`Payloads.local_path`): what went out in a C-STORE cannot be taken back.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import httpx
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from dicomgrid.core.audit import SERIOUS_FAILURE, SUCCESS, AuditObject, Participant
from dicomgrid.core.blobstore import BlobStoreError
from dicomgrid.core.config import SiteConfig
from dicomgrid.core.logging import get_logger
from dicomgrid.core.index_reader import StoredInstance
from dicomgrid.core.site import SiteContext

log = get_logger(__name__)

DIGEST = re.compile(r"[0-9a-f]{64}")
CHUNK_BYTES = 1024 * 1024
VERIFY_FIRST_MAX_BYTES = 64 * 1024 * 1024
PEER_PATH = "/internal/payloads/{sha256}"
SITE_HEADER = "X-Dicomgrid-Site"
# Audit records list at most this many instances; the study objects carry the full counts.
AUDIT_MAX_INSTANCES = 1000


class PayloadUnavailable(RuntimeError):
    """No intact copy of the payload could be found at this site or any peer."""


class _PeerRefused(RuntimeError):
    """A peer answered, but not with the payload."""


class PayloadCorrupt(RuntimeError):
    """Bytes did not match their digest: a local copy found corrupt while it streamed, or a peer's copy."""


def find_instances(
    site: SiteContext, study_uid: str, series_uid: str | None = None, sop_instance_uids: Iterable[str] = ()
) -> list[StoredInstance]:
    """The newest indexed version of the instances of a study, one of its series, or some of its instances."""
    return site.index.find_instances(study_uid, series_uid, sop_instance_uids)


def transfer_objects(instances: list[StoredInstance]) -> list[AuditObject]:
    """Audit objects of a transfer: every study (with its instance count), then its instances."""
    per_study: dict[str, int] = {}
    for item in instances:
        per_study[item.study_uid] = per_study.get(item.study_uid, 0) + 1
    objects = [AuditObject("study", uid, {"instances": count}) for uid, count in per_study.items()]
    objects += [
        AuditObject("instance", item.sop_instance_uid, {"sop_class_uid": item.sop_class_uid})
        for item in instances[:AUDIT_MAX_INSTANCES]
    ]
    return objects


class PayloadReader:
    """An open payload, read in chunks; with ``check`` its digest is verified as the chunks go out."""

    def __init__(self, fh: BinaryIO, digest: str, check: bool, on_corrupt: Callable[[str], None]) -> None:
        self._fh = fh
        self.digest = digest
        self.size = os.fstat(fh.fileno()).st_size
        self._check = check
        self._on_corrupt = on_corrupt

    @property
    def file(self) -> BinaryIO:
        return self._fh

    def __iter__(self) -> Iterator[bytes]:
        hasher = hashlib.sha256() if self._check else None
        try:
            self._fh.seek(0)
            while chunk := self._fh.read(CHUNK_BYTES):
                if hasher is not None:
                    hasher.update(chunk)
                yield chunk
        finally:
            self.close()
        if hasher is not None and hasher.hexdigest() != self.digest:
            self._on_corrupt(self.digest)
            raise PayloadCorrupt(f"payload {self.digest} does not match its digest")

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "PayloadReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hash_file(fh: BinaryIO) -> str:
    hasher = hashlib.sha256()
    fh.seek(0)
    while chunk := fh.read(CHUNK_BYTES):
        hasher.update(chunk)
    return hasher.hexdigest()


class _KeyedLocks:
    """One lock per digest, so concurrent requests for a damaged payload repair it once."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class Payloads:
    """Verified payload bytes for one site's retrieve services, repaired from peers when needed."""

    def __init__(self, site: SiteContext, *, connect_timeout_s: float = 3.0, read_timeout_s: float = 30.0) -> None:
        self.site = site
        self.blobs = site.blobs
        # One pooled client for every fetch (httpx clients may be shared between threads). Peer traffic
        # stays inside the grid: proxy settings from the environment are not applied to it.
        self._http = httpx.Client(timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s), trust_env=False)
        self._locks = _KeyedLocks()

    # -- reading --------------------------------------------------------------------------------

    def local_path(self, digest: str) -> Path:
        """The path of an intact local copy (fully verified; repaired from a peer first if needed).

        For senders that open the file themselves (pynetdicom's C-STORE from a path): bytes that went out
        over DIMSE cannot be taken back, so the whole payload is checked before.
        """
        self.open(digest, verify_first=True).close()
        return self.blobs.path(digest)

    def open(self, digest: str, *, verify_first: bool = False) -> PayloadReader:
        """An intact payload, open for reading (see the module docstring for when it is verified).

        Raises :class:`PayloadUnavailable` when neither this site nor any peer has an intact copy.
        """
        fh = self._open_local(digest)
        if fh is not None:
            if not verify_first and os.fstat(fh.fileno()).st_size > VERIFY_FIRST_MAX_BYTES:
                return PayloadReader(fh, digest, True, self._quarantine)
            if _hash_file(fh) == digest:
                return PayloadReader(fh, digest, False, self._quarantine)
            fh.close()
        with self._locks(digest):
            # Another request may have repaired it while this one waited for the lock.
            fh = self._open_local(digest)
            if fh is not None and _hash_file(fh) == digest:
                return PayloadReader(fh, digest, False, self._quarantine)
            reason = "missing"
            if fh is not None:
                fh.close()
                reason = "corrupt"
                self._quarantine(digest)
            self._repair(digest, reason)
            fh = self._open_local(digest)
            if fh is None:
                raise PayloadUnavailable(f"payload {digest} vanished right after its repair")
            return PayloadReader(fh, digest, False, self._quarantine)

    def _open_local(self, digest: str) -> BinaryIO | None:
        try:
            return self.blobs.open(digest)
        except FileNotFoundError:
            return None

    def _quarantine(self, digest: str) -> None:
        target = self.blobs.quarantine(digest)
        if target is not None:
            log.error("corrupt payload moved aside", site=self.site.site.name, sha256=digest, to=str(target))

    # -- repair from peers ----------------------------------------------------------------------

    def peers(self, digest: str) -> list[SiteConfig]:
        """Sites to ask for a payload: those the ledger lists first, then every other configured site."""
        try:
            listed = [row.site for row in self.site.ledger.replicas(digest)]
        except Exception as exc:  # the ledger is advisory: without it, every site is asked
            log.warning("replica ledger unavailable; asking every site", sha256=digest, error=str(exc))
            listed = []
        configured = [s.name for s in self.site.config.sites]
        order = dict.fromkeys(name for name in [*listed, *configured] if name in configured)
        order.pop(self.site.site.name, None)
        return [self.site.config.site(name) for name in order]

    def _repair(self, digest: str, reason: str) -> None:
        errors = []
        for peer in self.peers(digest):
            try:
                size = self._fetch(peer, digest)
            except (httpx.HTTPError, PayloadCorrupt, BlobStoreError, _PeerRefused) as exc:
                errors.append(f"{peer.name}: {exc}")
                log.warning("payload fetch from peer failed", sha256=digest, peer=peer.name, error=str(exc))
                continue
            self._report_repair(digest, reason, peer, size)
            return
        detail = "; ".join(errors) or "no other site configured"
        self.site.audit.record(
            "C",
            "DICOM Instances Transferred",
            SERIOUS_FAILURE,
            f"local replica {reason} and no intact copy found at any peer ({detail})",
            [self._me()],
            [AuditObject("payload", digest, {"reason": reason})],
        )
        raise PayloadUnavailable(f"payload {digest} is {reason} locally and no peer has an intact copy ({detail})")

    def _fetch(self, peer: SiteConfig, digest: str) -> int:
        """Stream a peer's copy into the blob store, verifying it on the way; returns its size."""
        url = f"http://{peer.http_host}:{peer.http_port}{PEER_PATH.format(sha256=digest)}"
        headers = {"Authorization": f"Bearer {self.site.config.security.peer_token}", SITE_HEADER: self.site.site.name}
        with self._http.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise _PeerRefused(f"HTTP {response.status_code}")
            hasher = hashlib.sha256()
            with self.blobs.writer(max_bytes=self.site.site.max_instance_bytes) as writer:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    hasher.update(chunk)
                    writer.write(chunk)
                if hasher.hexdigest() != digest:
                    raise PayloadCorrupt(f"{peer.name} sent bytes that do not match {digest}")
                return writer.commit().size

    def _report_repair(self, digest: str, reason: str, peer: SiteConfig, size: int) -> None:
        log.warning(
            "local replica repaired from peer",
            site=self.site.site.name,
            sha256=digest,
            reason=reason,
            from_site=peer.name,
            size=size,
            needs_replication=True,
        )
        self.site.audit.record(
            "C",
            "DICOM Instances Transferred",
            SUCCESS,
            f"local replica {reason}; verified copy fetched from site {peer.name} and stored",
            [
                Participant(peer.name, False, peer.ae_title, f"{peer.http_host}:{peer.http_port}", "Source"),
                self._me(),
            ],
            [AuditObject("payload", digest, {"reason": reason, "from_site": peer.name, "size": size})],
        )

    def _me(self) -> Participant:
        me = self.site.site
        return Participant(me.name, True, me.ae_title, None, "Destination")

    # -- serving peers --------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [Route(PEER_PATH, self._serve_peer, methods=["GET"])]

    async def _serve_peer(self, request: Request) -> Response:
        """A peer fetches this site's local copy (never anyone else's), checked as it streams."""
        if not self._authorized(request):
            return JSONResponse({"error": "missing or invalid bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        digest = request.path_params["sha256"]
        if not DIGEST.fullmatch(digest):
            return JSONResponse({"error": "not a lowercase hex SHA-256 digest"}, status_code=400)
        fh = await run_in_threadpool(self._open_local, digest)
        if fh is None:
            return JSONResponse({"error": "no local copy"}, status_code=404)
        reader = PayloadReader(fh, digest, True, self._quarantine)
        peer_site = request.headers.get(SITE_HEADER, "unknown")[:64]
        address = f"{request.client.host}:{request.client.port}" if request.client else None
        self.site.audit.record(
            "R",
            "DICOM Instances Transferred",
            SUCCESS,
            f"payload sent to peer site {peer_site}",
            [Participant(peer_site, True, None, address, "Destination"), self._source()],
            [AuditObject("payload", digest, {"size": reader.size})],
        )
        return StreamingResponse(
            reader, media_type="application/octet-stream", headers={"Content-Length": str(reader.size)}
        )

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = self.site.config.security.peer_token
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())

    def _source(self) -> Participant:
        me = self.site.site
        return Participant(me.name, False, me.ae_title, None, "Source")


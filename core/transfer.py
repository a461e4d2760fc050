"""Payload transfer between sites: the client that fetches verified copies from a peer's endpoint.

Every movement of payload bytes from one site to another goes through here: a retrieve that repairs a
missing or corrupt local copy (:mod:`dicomgrid.consumers.payloads`), the replication worker
(:mod:`dicomgrid.processors.replicator`) and the healing jobs.

The endpoint (:mod:`dicomgrid.core.transfer_endpoint`) is on each site's HTTP port (HTTPS when
``tls.http``), behind the site's token check: a request carries a token the asking site signed with its
own key, addressed to the site asked, scope ``replicate`` (:class:`~dicomgrid.core.tokens.PeerTokens`).
``GET /internal/payloads/{sha256}`` serves one payload, ``POST /internal/payloads`` several small ones
in one response (:meth:`PayloadTransfer.fetch_batch`). A site only ever serves its own local copy,
checked as it goes out, so a fetch never cascades from site to site. The client writes what it receives
into the local blob store while hashing it, and a copy is named (committed) only when its SHA-256
matches.

Peers are tried in this order: the sites the ``replicas`` ledger lists for the digest, then every other
configured site, because a copy may exist that the ledger does not list yet (one fetched by an earlier
retrieve, or a replication still in flight).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import httpx

from dicomgrid import schemas
from dicomgrid.core import payload_frames
from dicomgrid.core.blobstore import BlobBusy, BlobRef, BlobStoreError, BlobWriter, PayloadCorrupt
from dicomgrid.core.config import SiteConfig
from dicomgrid.core.events import CopyCause, InstanceRef, replica_stored
from dicomgrid.core.kafka import PublishError
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.tls import http_verify
from dicomgrid.core.tokens import PeerTokens

log = get_logger(__name__)

DIGEST = re.compile(r"[0-9a-f]{64}")
PEER_PATH = "/internal/payloads/{sha256}"
BATCH_PATH = "/internal/payloads"
# Payloads asked for in one batch request.
BATCH_MAX = 64
# Resumes of one cut transfer before the peer counts as failed.
MAX_RESUMES = 3
# Payloads up to this size are read and checked whole before any byte goes out, and may travel in a
# batch (see the endpoint).
WHOLE_BODY_BYTES = payload_frames.FRAME_MAX_BYTES
# What a cut connection looks like to the client: the response ended early or the peer went quiet.
_CUT_OFF = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout)


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


    def fetch_batch(self, peer: SiteConfig, digests: Sequence[str]) -> dict[str, BlobRef | str]:
        """Fetch up to :data:`BATCH_MAX` small payloads from one peer in one request.

        Returns, for each digest, the verified local copy, or why it was not fetched (the peer has no
        intact copy, it is too large for a batch, its bytes did not match, the response was cut or
        refused): the caller fetches those on their own (:meth:`fetch_from_any`), with its retries.
        Each copy is committed as its frame arrives, so a response cut half-way keeps what came whole.
        """
        digests = list(dict.fromkeys(digests))
        if not 0 < len(digests) <= BATCH_MAX:
            raise ValueError(f"a batch asks for 1 to {BATCH_MAX} payloads, not {len(digests)}")
        out: dict[str, BlobRef | str] = {}
        frames = payload_frames.FrameReader(digests)
        url = self.site.config.http_url(peer.name) + BATCH_PATH
        headers = {"Authorization": f"Bearer {self._tokens.for_site(peer.name)}"}
        try:
            with self._http.stream("POST", url, headers=headers, json={"sha256": digests}) as response:
                if response.status_code != 200:
                    raise PeerRefused(f"HTTP {response.status_code}")
                if response.headers.get("content-type", "").split(";")[0].strip() != payload_frames.MEDIA_TYPE:
                    raise PeerRefused("not a batch of payloads")
                for chunk in response.iter_bytes():
                    if self._throttle is not None:
                        self._throttle.take(len(chunk))
                    for frame in frames.feed(chunk):
                        out[frame.sha256] = self._commit_frame(peer, frame)
                frames.close()
        except (httpx.HTTPError, PeerRefused, payload_frames.FrameError) as exc:
            log.warning("batch payload fetch from peer failed", peer=peer.name, fetched=len(out),
                        left=len(frames.pending), error=str(exc))
            for digest in frames.pending:
                out[digest] = f"{peer.name}: {exc}"
        return out

    def _commit_frame(self, peer: SiteConfig, frame: payload_frames.Frame) -> BlobRef | str:
        if frame.status != 200:
            return f"{peer.name}: HTTP {frame.status} ({frame.error})"
        try:
            with self.site.blobs.writer(max_bytes=self.site.site.max_instance_bytes) as writer:
                writer.write(frame.body)
                if writer.hexdigest() != frame.sha256:
                    writer.discard()
                    log.warning("payload fetch from peer failed", sha256=frame.sha256, peer=peer.name,
                                error="bytes do not match the digest")
                    return f"{peer.name} sent bytes that do not match {frame.sha256}"
                return writer.commit()
        except BlobStoreError as exc:
            return f"local copy not stored: {exc}"


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


def record_copies(site: SiteContext, copies: Sequence[tuple[BlobRef, InstanceRef, str | None]], source_site: str,
                  *, cause: CopyCause) -> None:
    """:func:`record_copy` of several copies fetched from ``source_site``: their events published together
    and awaited, then their rows in one ledger round. Raises :class:`PublishError` if any event was not
    confirmed, before any row is written (each copy is then recorded again by its redelivered request)."""
    if not copies:
        return
    if site.publisher is not None:
        futures = [site.publisher.publish(schemas.TOPIC_REPLICA_STORED, blob.sha256,
                                          replica_stored(blob, source_site, instance, cause=cause,
                                                         request_event_id=request_event_id))
                   for blob, instance, request_event_id in copies]
        for future in futures:
            site.publisher.wait(future, topic=schemas.TOPIC_REPLICA_STORED)
    site.ledger.record_many([blob for blob, _, _ in copies])

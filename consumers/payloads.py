"""Where the bytes of every retrieve come from (C-GET, C-MOVE, WADO): one place, always verified.

An instance is served from the site's own replica when that copy is present and intact (its SHA-256
matches its name). When it is missing or corrupt, a verified copy is fetched from another site over the
payload transfer service (:mod:`dicomgrid.core.transfer`), stored into the local blob store (which
repairs the local replica), and served from there. Each repair is logged, audited and recorded in the replica ledger, as a replicated
copy is.

Payloads up to :data:`IN_MEMORY_MAX_BYTES` (DIMSE sub-operations, WADO-RS) are read once, into memory,
and hashed there before their first byte goes out (:meth:`Payloads.verified_bytes`). For larger ones a
DIMSE sender gets a file hashed whole before it is sent (:meth:`Payloads.local_path`).

Otherwise (HTTP), verification costs a read of the payload. Payloads up to :data:`VERIFY_FIRST_MAX_BYTES` are hashed before
their first byte is served (then served from the same open file, from the page cache), so a corrupt local
copy can still be replaced by a peer's before anything goes out. Larger ones are hashed while they stream:
a mismatch then aborts the response (the receiver sees a truncated transfer, never a complete wrong one)
and moves the corrupt copy aside, so the next request repairs it. DIMSE senders always get a fully
verified file (:meth:`Payloads.local_path`): what went out in a C-STORE cannot be taken back.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomgrid.core.audit import SERIOUS_FAILURE, SUCCESS, AuditObject, Participant
from dicomgrid.core.blobstore import PayloadReader, hash_file
from dicomgrid.core.config import SiteConfig
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.index_reader import StoredInstance
from dicomgrid.core.transfer import PayloadTransfer, PayloadUnavailable, record_copy

log = get_logger(__name__)

VERIFY_FIRST_MAX_BYTES = 64 * 1024 * 1024
# DIMSE sends payloads up to this size from memory: one read, hashed before the first byte goes out.
IN_MEMORY_MAX_BYTES = 16 * 1024 * 1024


_TOO_LARGE = object()
_DIGEST = re.compile(r"[0-9a-f]{64}")


def _read_whole(path: str, max_bytes: int) -> bytes | object | None:
    """A file's bytes from one open and one read (None if absent, ``_TOO_LARGE`` above ``max_bytes``)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            return _TOO_LARGE
        data = os.read(fd, size)
        if len(data) < size:  # a short read (signals, very large files): read the rest
            rest = [data]
            while (got := sum(map(len, rest))) < size and (more := os.read(fd, size - got)):
                rest.append(more)
            data = b"".join(rest)
        return data
    finally:
        os.close(fd)


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

    def __init__(self, site: SiteContext, transfer: PayloadTransfer | None = None) -> None:
        self.site = site
        self.blobs = site.blobs
        self.transfer = transfer or PayloadTransfer(site)
        self._locks = _KeyedLocks()
        # BlobStore.path's layout as a string join: pathlib's parsing cost more than reading a small file.
        self._sha256_dir = os.fspath(self.blobs.path("0" * 64).parent.parent.parent)

    def _blob_path(self, digest: str) -> str:
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return f"{self._sha256_dir}/{digest[:2]}/{digest[2:4]}/{digest}"

    def local_path(self, item: StoredInstance) -> Path:
        """The path of an intact local copy (fully verified; repaired from a peer first if needed).

        For senders that open the file themselves (pynetdicom's C-STORE from a path): bytes that went out
        over DIMSE cannot be taken back, so the whole payload is checked before.
        """
        self.open(item, verify_first=True).close()
        return self.blobs.path(item.sha256)

    def verified_bytes(self, item: StoredInstance, max_bytes: int = IN_MEMORY_MAX_BYTES) -> bytes | None:
        """The whole intact payload, read once and hashed in memory; None when it is larger than
        ``max_bytes`` (then :meth:`local_path` or :meth:`open`).

        A missing or corrupt local copy is repaired first, as :meth:`open` does (quarantined, fetched
        from a peer); raises :class:`PayloadUnavailable` when no intact copy exists anywhere.
        """
        digest = item.sha256
        data = _read_whole(self._blob_path(digest), max_bytes)
        if data is _TOO_LARGE:
            return None
        if data is not None and hashlib.sha256(data).digest() == bytes.fromhex(digest):
            return data  # type: ignore[return-value]
        with self.open(item, verify_first=True) as reader:
            if reader.size > max_bytes:
                return None
            reader.file.seek(0)
            repaired = reader.file.read()
        if hashlib.sha256(repaired).hexdigest() != digest:
            raise PayloadUnavailable(f"payload {digest} changed while it was read after its repair")
        return repaired

    def open(self, item: StoredInstance, *, verify_first: bool = False) -> PayloadReader:
        """The intact payload of an indexed instance, open for reading (see the module docstring for when
        it is verified).

        Raises :class:`PayloadUnavailable` when neither this site nor any peer has an intact copy.
        """
        digest = item.sha256
        fh = self.blobs.open_if_present(digest)
        if fh is not None:
            if not verify_first and os.fstat(fh.fileno()).st_size > VERIFY_FIRST_MAX_BYTES:
                return PayloadReader(fh, digest, True, self.blobs.quarantine)
            if hash_file(fh) == digest:
                return PayloadReader(fh, digest, False, self.blobs.quarantine)
            fh.close()
        with self._locks(digest):
            # Another request may have repaired it while this one waited for the lock.
            fh = self.blobs.open_if_present(digest)
            if fh is not None and hash_file(fh) == digest:
                return PayloadReader(fh, digest, False, self.blobs.quarantine)
            reason = "missing"
            if fh is not None:
                fh.close()
                reason = "corrupt"
                self.blobs.quarantine(digest)
            self._repair(item, reason)
            fh = self.blobs.open_if_present(digest)
            if fh is None:
                raise PayloadUnavailable(f"payload {digest} vanished right after its repair")
            return PayloadReader(fh, digest, False, self.blobs.quarantine)

    def peers(self, digest: str) -> list[SiteConfig]:
        return self.transfer.peers(digest)

    def _repair(self, item: StoredInstance, reason: str) -> None:
        digest = item.sha256
        try:
            peer, blob = self.transfer.fetch_from_any(digest)
        except PayloadUnavailable as exc:
            self.site.audit.record(
                "C",
                "DICOM Instances Transferred",
                SERIOUS_FAILURE,
                f"local replica {reason} and {exc}",
                [self._me()],
                [AuditObject("payload", digest, {"reason": reason})],
            )
            raise PayloadUnavailable(f"payload {digest} is {reason} locally and {exc}") from exc
        log.warning(
            "local replica repaired from peer",
            site=self.site.site.name,
            sha256=digest,
            reason=reason,
            from_site=peer.name,
            size=blob.size,
        )
        record_copy(self.site, blob, peer.name, item.ref, cause="repair")
        self.site.audit.record(
            "C",
            "DICOM Instances Transferred",
            SUCCESS,
            f"local replica {reason}; verified copy fetched from site {peer.name} and stored",
            [
                Participant(peer.name, False, peer.ae_title, f"{peer.http_host}:{peer.http_port}", "Source"),
                self._me(),
            ],
            [AuditObject("payload", digest, {"reason": reason, "from_site": peer.name, "size": blob.size})],
        )

    def _me(self) -> Participant:
        me = self.site.site
        return Participant(me.name, True, me.ae_title, None, "Destination")

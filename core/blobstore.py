"""A site's content-addressed blob store: every payload is named by the SHA-256 of its bytes.

Layout under the store's root::

    sha256/ab/cd/abcd...   one file per distinct payload (immutable once renamed into place)
    tmp/                   payloads being written; never read by anyone else (``<digest>.resume``:
                           a transfer from another site, kept across crashes so it can resume)
    quarantine/            copies found corrupt, moved aside for inspection

A payload becomes visible only after its bytes and its directory entry are on stable storage (write to
``tmp/``, atomic rename, fsync; then an fsync of the directory, except on a filesystem whose fsync of a
new file already commits its entry, see :func:`entry_durable_with_file`). Paths derive from the digest
alone, never from UIDs or any other text a sender controls. Identical bytes are stored once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import itertools
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicomgrid.core.logging import get_logger
from dicomgrid.core.processes import own_tag, tag_alive

log = get_logger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024
# Extended attribute of a blob whose dicom.instance.stored event the brokers acknowledged (ingest).
_ANNOUNCED = "user.dicomgrid.announced"


class BlobStoreError(OSError):
    """The store could not make a payload durable (disk full, I/O error, permissions)."""


class PayloadTooLarge(BlobStoreError):
    """The payload exceeds the configured maximum size."""


class BlobBusy(BlobStoreError):
    """Another writer holds the resumable transfer of this payload."""


class PayloadCorrupt(RuntimeError):
    """Bytes did not match their digest: a local copy found corrupt while it streamed, or a peer's copy."""


@dataclass(frozen=True)
class BlobRef:
    """A durable payload at one site."""

    site: str
    sha256: str
    size: int

    @property
    def uri(self) -> str:
        return f"blob://{self.site}/sha256/{self.sha256}"

    def as_payload(self) -> dict[str, object]:
        """The payload reference carried by events (see schemas/events/common.schema.json)."""
        return {"uri": self.uri, "site": self.site, "sha256": self.sha256, "size": self.size}


def parse_blob_uri(uri: str) -> tuple[str, str]:
    """Split ``blob://SITE/sha256/DIGEST`` into (site, digest)."""
    prefix = "blob://"
    parts = uri[len(prefix):].split("/") if uri.startswith(prefix) else []
    if len(parts) != 3 or parts[1] != "sha256" or not _DIGEST.fullmatch(parts[2]):
        raise ValueError(f"not a blob URI: {uri!r}")
    return parts[0], parts[2]


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Filesystems on which fsync(2) of a file created and renamed into place also makes its directory
# entry durable, and those of directories just made for it, so that fsyncing them after it would only
# issue more cache flushes to the device (one each). ext4 with a journal commits the transaction that
# holds the rename (the renamed inode's change time is in it), and transactions commit in order, so the
# earlier mkdirs with it; ext4 without one syncs the new file's parent directory itself
# (ext4_sync_parent, for inodes added to a directory since their last fsync), then that directory's
# parent if the directory is new too, and so on up; XFS forces its log up to the inode's last change,
# which takes every earlier transaction with it. Anywhere else (NFS, overlay, FUSE, ext2's own driver,
# unknown) each directory is fsynced as POSIX asks.
_ENTRY_DURABLE_WITH_FILE = frozenset({"ext4", "xfs"})


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem mounted where ``path`` lies (as /proc/self/mountinfo names it)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            return mount_type(os.path.realpath(path), fh)
    except OSError:
        return None


def mount_type(target: str, mountinfo: Iterable[str]) -> str | None:
    """The filesystem type of the innermost mount holding the absolute path ``target``."""
    best, kind = "", None
    for line in mountinfo:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest.strip():
            continue
        # The kernel writes a space, tab, newline or backslash of a mount point as an octal escape.
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, rest.split()[0]
    return kind


def entry_durable_with_file(path: str | Path) -> bool:
    """Whether, under ``path``, a new file's fsync also commits its directory entry (see above)."""
    return filesystem_type(path) in _ENTRY_DURABLE_WITH_FILE


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Temp files of this process are numbered, not named at random: a random name costs a system call
# (getrandom) that releases the GIL on every payload.
_temp_numbers = itertools.count()


def _new_temp_file(tmp_dir: str) -> tuple[Path, int]:
    """A new temp file for a payload, and its descriptor.

    Named by the writing process (its pid and start time), so a crashed writer's leftovers can go at
    once (clear_tmp). Created read-only (the descriptor still writes): a stored payload is never
    changed, and no chmod is needed before it is renamed into place.
    """
    while True:
        path = f"{tmp_dir}/{own_tag()}.{next(_temp_numbers)}.part"
        try:
            return Path(path), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except FileExistsError:
            continue  # left by an earlier process that had the same pid in the same second


class _TempFile:
    """An unbuffered file on a descriptor: what ``open(fd, "wb", buffering=0)`` gives, without the
    ``fstat`` that opening it makes (once per payload, and each system call hands the GIL over)."""

    __slots__ = ("_fd", "path")

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    def write(self, data: bytes | memoryview) -> int:
        return os.write(self._fd, data)

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        pass  # nothing buffered

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self._fd, offset, whence)

    def truncate(self) -> None:
        os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_CUR))

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class SpareTemp:
    """An empty temp file created ahead of the payload that will fill it (:meth:`BlobStore.spare`).

    Creating a file is the costliest step of a small payload's write on some disks, and a storage
    association knows it will want one for its next C-STORE: made while the sender prepares that
    instance, it costs the instance nothing. Hand it to one :class:`BlobWriter`, or :meth:`discard` it.
    """

    __slots__ = ("_file",)

    def __init__(self, tmp_dir: str) -> None:
        path, fd = _new_temp_file(tmp_dir)
        self._file: _TempFile | None = _TempFile(fd, path)

    def take(self) -> _TempFile:
        file, self._file = self._file, None
        if file is None:
            raise RuntimeError("spare temp file already taken")
        return file

    def discard(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()
            file.path.unlink(missing_ok=True)


def _write_all(fh: BinaryIO | _TempFile, data: bytes | memoryview) -> None:
    # An unbuffered file may take less than it is given.
    view = memoryview(data)
    while view:
        view = view[fh.write(view):]


class BlobWriter:
    """Streams one payload into the store; :meth:`commit` makes it durable and returns its ref."""

    def __init__(self, store: "BlobStore", max_bytes: int | None, resume: str | None = None, *,
                 keep: int = 0, spare: SpareTemp | None = None) -> None:
        self._store = store
        self._max = max_bytes
        self._hash = hashlib.sha256()
        self._size = 0
        # A copy of up to ``keep`` bytes for :meth:`reopen`, which then reads memory, not the file.
        self._keep = keep
        self._kept: bytearray | None = bytearray() if keep > 0 and resume is None else None
        self.resumable = resume is not None
        # After commit: whether the same bytes were already stored under their digest.
        self.existed = False
        # The temp file is gone (renamed into place or removed): nothing left for abort to remove.
        self._done = False
        # Bytes accounted for (hashed, counted, kept) but written with the next write (:meth:`hold`).
        self._held = b""
        self._fh: BinaryIO | _TempFile | None
        if resume is None:
            # Unbuffered: the data set arrives in fragments of tens of KB, which a buffer would only
            # copy, and opening a buffered file costs two more system calls (isatty, tell).
            if spare is not None:
                temp = spare.take()
            else:
                path, fd = _new_temp_file(store.tmp_dir)
                temp = _TempFile(fd, path)
            self._tmp, self._fh = temp.path, temp
        else:
            self._tmp = store.root / "tmp" / f"{store.path(resume).name}.resume"
            self._fh = self._tmp.open("ab+")
            try:
                # One writer per resumable payload, across processes; the lock goes with the file.
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._close()
                raise BlobBusy(errno.EBUSY, f"payload {resume} is being written by another transfer") from None
            # What an earlier, interrupted transfer wrote: hashed again, so the digest covers every byte.
            self._fh.seek(0)
            while chunk := self._fh.read(_CHUNK):
                self._hash.update(chunk)
                self._size += len(chunk)

    @property
    def size(self) -> int:
        """Bytes written so far (for a resumed transfer, including the earlier attempts' bytes)."""
        return self._size

    def hexdigest(self) -> str:
        """The SHA-256 of the bytes written so far."""
        return self._hash.hexdigest()

    def restart(self) -> None:
        """Forget what was written (a resumed transfer whose bytes turned out wrong)."""
        assert self._fh is not None, "writer already closed"
        self._fh.seek(0)
        self._fh.truncate()
        self._hash = hashlib.sha256()
        self._size = 0
        self._held = b""
        self._kept = bytearray() if self._keep > 0 else None

    def write(self, data: bytes | memoryview) -> None:
        assert self._fh is not None, "writer already closed"
        self._account(data)
        if self._held:
            data, self._held = self._held + data, b""
        self._write(data)

    def hold(self, data: bytes) -> None:
        """:meth:`write` ``data`` (a small head: the file meta), in one system call with the next write.

        The payload is the same; what is held is written at the latest by :meth:`commit` or :meth:`reopen`.
        """
        assert self._fh is not None, "writer already closed"
        self._account(data)
        self._held += data

    def _account(self, data: bytes | memoryview) -> None:
        self._size += len(data)
        if self._max is not None and self._size > self._max:
            raise PayloadTooLarge(errno.EFBIG, f"payload exceeds {self._max} bytes")
        self._hash.update(data)
        if self._kept is not None:
            if self._size <= self._keep:
                self._kept += data
            else:
                self._kept = None

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        try:
            _write_all(self._fh, data)
        except OSError as exc:
            raise BlobStoreError(exc.errno, f"cannot write payload: {exc.strerror}") from exc

    def _write_held(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            self._write(held)

    def copy_from(self, src: BinaryIO, offset: int = 0) -> None:
        """Append the rest of ``src`` from ``offset``."""
        src.seek(offset)
        while chunk := src.read(_CHUNK):
            self.write(chunk)

    def reopen(self) -> BinaryIO:
        """What was written so far, for reading (before :meth:`commit`).

        From the kept copy when the payload fits in it: reading a small payload back through the file
        costs an open and a system call per seek, each of which hands the GIL to another thread.
        """
        assert self._fh is not None, "writer already closed"
        if self._kept is not None:
            return io.BytesIO(self._kept)
        self._write_held()
        self._fh.flush()
        return self._tmp.open("rb")

    def commit(self) -> BlobRef:
        """Make the payload durable under its digest and return its ref.

        The temp file is renamed into place *before* it is fsynced: the one fsync then commits the
        data, the new directory entries and the rename in a single journal transaction. Where that
        fsync makes the entry durable by itself (:func:`entry_durable_with_file`), no directory is
        fsynced after it, not even those made for this payload; elsewhere they all are.
        A crash in between can leave a name whose bytes are not all on disk, so an existing file is
        trusted only after its bytes hash to its name, and no event names a payload before
        :meth:`commit` returns.
        """
        assert self._fh is not None, "writer already closed"
        digest = self._hash.hexdigest()
        final = self._store.path_name(digest)
        renamed = False
        try:
            self._write_held()
            self._fh.flush()
            created = self._store.shard_dirs(digest)
            # A directory made just now holds no payload yet.
            stored = None if created else self._store.stored_digest(digest)
            if stored == digest:
                # The same bytes are already stored; make sure they are on disk, not just cached.
                _fsync_path(final)
                self._close()
                self._tmp.unlink()
                self._done = True
                self.existed = True
            else:
                if stored is not None:  # a corrupt copy under the name: kept aside, replaced
                    self._store.quarantine(digest)
                if self.resumable:
                    os.chmod(self._tmp, 0o444)
                try:
                    os.replace(self._tmp, final)
                except FileNotFoundError:
                    # The shard directory was removed under the store since (a wiped disk being
                    # rebuilt): made again.
                    self._store.forget_shard(digest)
                    created = self._store.shard_dirs(digest)
                    os.replace(self._tmp, final)
                renamed = self._done = True
                assert self._fh is not None
                os.fsync(self._fh.fileno())
                self._close()
                if not self._store.entry_durable_with_file:
                    _fsync_dir(os.path.dirname(final))
                    for directory in created:
                        _fsync_dir(os.path.dirname(directory))
        except OSError as exc:
            self._done = False
            self.abort()
            if renamed:
                with suppress(FileNotFoundError):
                    os.unlink(final)
            raise BlobStoreError(exc.errno, f"cannot make payload durable: {exc.strerror}") from exc
        return BlobRef(self._store.site, digest, self._size)

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def abort(self) -> None:
        """Give up; a resumable writer keeps what it wrote for the next attempt."""
        self._close()
        if not self.resumable and not self._done:
            self._tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        """Give up and remove what was written, resumable or not."""
        self._close()
        self._tmp.unlink(missing_ok=True)


class PayloadReader:
    """An open payload, read in chunks; with ``check`` its digest is verified as the chunks go out.

    A checked reader never delivers a complete wrong payload: the last chunk is held back until every
    byte has hashed to the digest, and a mismatch raises :class:`PayloadCorrupt` instead (the receiver
    sees a truncated transfer) after moving the corrupt copy aside (``on_corrupt``). A byte range is
    checked the same way: the bytes before and after it are hashed without being sent.
    """

    def __init__(self, fh: BinaryIO, digest: str, check: bool, on_corrupt: Callable[[str], object]) -> None:
        self._fh = fh
        self.digest = digest
        self.size = os.fstat(fh.fileno()).st_size
        self._check = check
        self._on_corrupt = on_corrupt

    @property
    def file(self) -> BinaryIO:
        return self._fh

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks()

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, end)`` (default: all), in chunks; the reader is closed when they are done."""
        end = self.size if end is None else end
        hasher = hashlib.sha256() if self._check else None
        try:
            self._fh.seek(0 if hasher is not None else start)
            position = self._fh.tell()
            held: bytes | None = None
            while chunk := self._fh.read(_CHUNK):
                if hasher is not None:
                    hasher.update(chunk)
                lo, hi = max(start - position, 0), min(end - position, len(chunk))
                position += len(chunk)
                if lo < hi:
                    if held is not None:
                        yield held
                    held = chunk[lo:hi]
                if hasher is None and position >= end:
                    break
            if hasher is not None and hasher.hexdigest() != self.digest:
                self._on_corrupt(self.digest)
                raise PayloadCorrupt(f"payload {self.digest} does not match its digest")
            if held is not None:
                yield held
        finally:
            self.close()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "PayloadReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hash_file(fh: BinaryIO) -> str:
    """The SHA-256 of an open file's whole contents."""
    hasher = hashlib.sha256()
    fh.seek(0)
    while chunk := fh.read(_CHUNK):
        hasher.update(chunk)
    return hasher.hexdigest()


class BlobStore:
    """One site's payloads on local disk."""

    def __init__(self, root: Path, site: str) -> None:
        self.root = Path(root)
        self.site = site
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        # As strings: the receive path names a few files per instance, and pathlib's joins and
        # conversions had cost more than the rest of the blob store's Python work for a small one.
        self.tmp_dir = os.fspath(self.root / "tmp")
        self._objects = os.fspath(self.root / "sha256")
        # Read once: a store does not move to another filesystem while it is open.
        self.entry_durable_with_file = entry_durable_with_file(self._objects)
        # The shard directories (by the digest's first four hex digits) this process made or found;
        # a payload going to one of them costs no system call for its directory.
        self._shards = bytearray(1 << 16)

    def path(self, digest: str) -> Path:
        return Path(self.path_name(digest))

    def path_name(self, digest: str) -> str:
        """:meth:`path` as a string."""
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return f"{self._objects}/{digest[:2]}/{digest[2:4]}/{digest}"

    def shard_dirs(self, digest: str) -> list[str]:
        """Make sure the directories of ``digest``'s payload exist; those created now, outermost first
        (each one's parent needs an fsync where the file's does not commit it)."""
        shard = int(digest[:4], 16)
        if self._shards[shard]:
            return []
        top = f"{self._objects}/{digest[:2]}"
        parent = f"{top}/{digest[2:4]}"
        # mkdir is the test: in a store that is filling up most shards are new, and a shard that
        # exists costs one refused mkdir per process.
        try:
            os.mkdir(parent)
            created = [parent]
        except FileExistsError:
            created = []
        except FileNotFoundError:
            # The first shard under its top-level directory, or a store wiped under the process.
            created = [d for d in (top, parent) if not os.path.exists(d)]
            os.makedirs(parent, exist_ok=True)
        self._shards[shard] = 1
        return created

    def forget_shard(self, digest: str) -> None:
        """``digest``'s shard directory is gone (removed under the store): made again when next needed."""
        self._shards[int(digest[:4], 16)] = 0

    def spare(self) -> SpareTemp:
        """An empty temp file for a later :class:`BlobWriter` (``spare=``); raises :class:`BlobStoreError`."""
        try:
            return SpareTemp(self.tmp_dir)
        except OSError as exc:
            raise BlobStoreError(exc.errno, f"cannot create a temp file: {exc.strerror}") from exc

    @contextmanager
    def writer(self, max_bytes: int | None = None, *, resume: str | None = None) -> Iterator[BlobWriter]:
        """A writer that is aborted unless committed inside the block.

        With ``resume`` (the digest the bytes should hash to), the temp file is named by that digest and
        survives an abort or a crash, so a later writer for the same digest continues where it stopped.
        """
        writer = BlobWriter(self, max_bytes, resume)
        try:
            yield writer
        finally:
            writer.abort()

    def put_chunks(self, chunks: Iterable[bytes], max_bytes: int | None = None) -> BlobRef:
        with self.writer(max_bytes) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def put_bytes(self, data: bytes) -> BlobRef:
        return self.put_chunks([data])

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def open(self, digest: str) -> BinaryIO:
        return open(self.path_name(digest), "rb")

    def open_if_present(self, digest: str) -> BinaryIO | None:
        try:
            return self.open(digest)
        except FileNotFoundError:
            return None

    def ref(self, digest: str) -> BlobRef:
        return BlobRef(self.site, digest, self.size(digest))

    def mark_announced(self, digest: str) -> None:
        """Note on the payload that its ``dicom.instance.stored`` event is acknowledged by the brokers.

        An extended attribute of the blob, not fsynced: a crash may lose it, and then a resend of the
        same bytes is announced once more (the indexer recognises the digest), never the other way round.
        It is set only after the acknowledgement, so a marked payload always has its event in Kafka.
        """
        try:
            os.setxattr(self.path_name(digest), _ANNOUNCED, b"1")
        except OSError as exc:  # no xattr support, or the file went (quarantined): resends are re-announced
            log.debug("announced mark not set", sha256=digest, error=str(exc))

    def is_announced(self, digest: str) -> bool:
        """Whether :meth:`mark_announced` was called for the stored payload (False if unknown)."""
        try:
            return os.getxattr(self.path_name(digest), _ANNOUNCED) == b"1"
        except OSError:
            return False

    def verify(self, digest: str) -> bool:
        """Re-hash a stored payload; False if it is missing or its bytes no longer match its name."""
        return self.stored_digest(digest) == digest

    def stored_digest(self, digest: str) -> str | None:
        """The SHA-256 of the bytes stored under ``digest`` (re-hashed), None if there are none."""
        hasher = hashlib.sha256()
        try:
            with self.open(digest) as fh:
                while chunk := fh.read(_CHUNK):
                    hasher.update(chunk)
        except FileNotFoundError:
            return None
        return hasher.hexdigest()

    def digests(self) -> Iterator[str]:
        """Every stored digest (for scrubbing and rebuilds)."""
        for path in (self.root / "sha256").glob("*/*/*"):
            if _DIGEST.fullmatch(path.name):
                yield path.name

    def quarantine(self, digest: str) -> Path | None:
        """Move a corrupt copy to ``quarantine/`` (kept for inspection), out of the way of a repaired one.

        Returns where it went, or None if there was no copy.
        """
        target = self.root / "quarantine" / f"{digest}.{uuid.uuid4().hex}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.path(digest), target)
        except FileNotFoundError:
            return None
        log.error("corrupt payload moved aside", site=self.site, sha256=digest, to=str(target))
        return target

    def clear_tmp(self, *, idle_s: float = 600.0, resume_idle_s: float = 86_400.0) -> int:
        """Remove partial payloads left by a crash; returns how many.

        Other processes of the site may be writing into ``tmp/`` right now: a partial payload goes at
        once when the process named in it is gone, otherwise (and for files of older releases, which
        name no process) once nobody has written to it for ``idle_s``. A resumable transfer's file
        (``.resume``) is what lets a killed replication worker continue; it is kept for ``resume_idle_s``.
        """
        removed = 0
        now = time.time()
        for path in (self.root / "tmp").iterdir():
            limit = resume_idle_s if path.suffix == ".resume" else idle_s
            owner = path.name.split(".", 1)[0] if path.suffix == ".part" and path.name.count(".") == 2 else None
            try:
                if (owner is not None and not tag_alive(owner)) or now - path.stat().st_mtime > limit:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        if removed:
            log.info("crash leftovers removed from the blob store", site=self.site, files=removed)
        return removed

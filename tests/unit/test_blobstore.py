import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicomgrid.core import blobstore
from dicomgrid.core.blobstore import BlobStore, BlobStoreError, PayloadTooLarge, mount_type, parse_blob_uri


def test_content_addressed_and_deduplicated(tmp_path: Path):
    store = BlobStore(tmp_path, "A")
    data = b"DICM" * 1000
    ref = store.put_bytes(data)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert ref.size == len(data)
    assert ref.uri == f"blob://A/sha256/{ref.sha256}"
    assert parse_blob_uri(ref.uri) == ("A", ref.sha256)
    path = store.path(ref.sha256)
    assert path.read_bytes() == data
    assert path.relative_to(tmp_path).parts[:3] == ("sha256", ref.sha256[:2], ref.sha256[2:4])
    assert store.put_bytes(data) == ref  # identical bytes stored once
    assert list(store.digests()) == [ref.sha256]
    assert not any((tmp_path / "tmp").iterdir())
    assert store.verify(ref.sha256)


def test_paths_never_come_from_caller_text(tmp_path: Path):
    store = BlobStore(tmp_path, "A")
    for hostile in ("../../etc/passwd", "a" * 64 + "/..", "A" * 64, ""):
        with pytest.raises(ValueError):
            store.path(hostile)
    with pytest.raises(ValueError):
        parse_blob_uri("blob://A/sha256/../../etc")


def test_size_limit_leaves_nothing_behind(tmp_path: Path):
    store = BlobStore(tmp_path, "A")
    with pytest.raises(PayloadTooLarge):
        store.put_chunks([b"x" * 600, b"x" * 600], max_bytes=1000)
    assert not any((tmp_path / "tmp").iterdir())
    assert list(store.digests()) == []


def _stored_then_corrupted(tmp_path: Path) -> tuple[BlobStore, str]:
    """A store holding b"payload" whose file was then overwritten with same-size wrong bytes."""
    store = BlobStore(tmp_path, "A")
    digest = store.put_bytes(b"payload").sha256
    path = store.path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"pAyload")
    return store, digest


def test_corruption_is_detected(tmp_path: Path):
    store, digest = _stored_then_corrupted(tmp_path)
    assert not store.verify(digest)
    assert not store.verify("0" * 64)


def test_write_failure_is_a_store_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = BlobStore(tmp_path, "A")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(BlobStoreError, match="No space"):
        store.put_bytes(b"abc")
    assert not any((tmp_path / "tmp").iterdir())
    assert list(store.digests()) == []


def test_quarantine_makes_room_for_a_repaired_copy(tmp_path: Path):
    store, digest = _stored_then_corrupted(tmp_path)
    moved = store.quarantine(digest)
    assert moved is not None and moved.read_bytes() == b"pAyload"
    store.put_bytes(b"payload")
    assert store.verify(digest)
    assert store.quarantine("0" * 64) is None


def test_commit_over_a_corrupt_copy_repairs_it_and_keeps_the_corrupt_one_aside(tmp_path: Path):
    # A crash between rename and fsync can leave a name whose bytes never reached the disk.
    store, digest = _stored_then_corrupted(tmp_path)
    assert store.put_bytes(b"payload").sha256 == digest
    assert store.verify(digest)
    (kept,) = (tmp_path / "quarantine").iterdir()
    assert kept.read_bytes() == b"pAyload"


def test_failed_fsync_after_rename_leaves_no_payload_under_its_name(tmp_path: Path, monkeypatch):
    store = BlobStore(tmp_path, "A")
    real_replace = os.replace
    renamed = []

    def replace_then_fail_fsync(src, dst):
        real_replace(src, dst)
        renamed.append(dst)

        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_space)

    monkeypatch.setattr(os, "replace", replace_then_fail_fsync)
    with pytest.raises(BlobStoreError, match="No space"):
        store.put_bytes(b"abc")
    assert renamed, "the failure was injected after the rename"
    assert list(store.digests()) == []
    assert not any((tmp_path / "tmp").iterdir())


def test_a_dead_writers_partial_payload_goes_at_once_and_a_live_ones_stays(tmp_path: Path):
    store = BlobStore(tmp_path, "A")
    # A writer in a process of its own, killed before it commits.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom pathlib import Path\nfrom dicomgrid.core.blobstore import BlobWriter, BlobStore\n"
         "w = BlobWriter(BlobStore(Path(sys.argv[1]), 'A'), None)\nw.write(b'x' * 100)\nw._fh.flush()\n"
         "print('ready', flush=True)\ntime.sleep(60)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    with store.writer() as mine:
        mine.write(b"y" * 100)
        (theirs,) = [p for p in (tmp_path / "tmp").glob("*.part") if str(child.pid) in p.name.split(".")[0]]
        assert store.clear_tmp(idle_s=600) == 0, "the writer is alive"
        child.kill()
        child.wait()
        assert store.clear_tmp(idle_s=600) == 1
        assert not theirs.exists()
        # This process's own write in progress is left alone.
        assert len(list((tmp_path / "tmp").glob("*.part"))) == 1
        mine.commit()


def test_a_payload_is_stored_after_its_directories_were_removed_under_the_writer(tmp_path: Path):
    # The store remembers directories it made; a wiped store (a lost disk being rebuilt) makes them again.
    store = BlobStore(tmp_path / "blobs", "A")
    first = store.put_bytes(b"one")
    shutil.rmtree(tmp_path / "blobs" / "sha256")
    (tmp_path / "blobs" / "sha256").mkdir()
    again = store.put_bytes(b"one")
    assert again.sha256 == first.sha256 and store.verify(first.sha256)
    assert store.path(first.sha256).stat().st_mode & 0o777 == 0o444


@pytest.mark.parametrize("keep", [0, 64, 1024])
def test_what_a_writer_gives_back_before_commit_is_what_was_written_kept_in_memory_or_not(tmp_path: Path, keep: int):
    """A received data set is checked as it was written; a writer keeps a copy up to ``keep`` bytes,
    beyond which it reads the temp file back: either way the reader sees exactly the bytes written."""
    from dicomgrid.core.blobstore import BlobWriter

    store = BlobStore(tmp_path, "A")
    writer = BlobWriter(store, None, keep=keep)
    parts = [os.urandom(100), os.urandom(150), os.urandom(200)]
    for part in parts:
        writer.write(memoryview(part))
    with writer.reopen() as fp:
        assert fp.read() == b"".join(parts)
    ref = writer.commit()
    assert store.path(ref.sha256).read_bytes() == b"".join(parts)


def test_a_writer_that_restarts_gives_back_only_what_was_written_since(tmp_path: Path):
    from dicomgrid.core.blobstore import BlobWriter

    writer = BlobWriter(BlobStore(tmp_path, "A"), None, keep=1024)
    writer.write(b"wrong bytes")
    writer.restart()
    writer.write(b"right")
    with writer.reopen() as fp:
        assert fp.read() == b"right"
    writer.abort()


@pytest.mark.parametrize("keep", [0, 1024])
@pytest.mark.parametrize("fragments", [0, 1, 3])
def test_a_held_head_is_part_of_the_payload_whether_or_not_anything_follows(tmp_path: Path, keep: int,
                                                                            fragments: int):
    """The file meta is held and written with the first fragment (one system call for both); with no
    fragment after it, commit and reopen still find it."""
    from dicomgrid.core.blobstore import BlobWriter

    store = BlobStore(tmp_path, "A")
    writer = BlobWriter(store, None, keep=keep)
    head, parts = os.urandom(40), [os.urandom(300) for _ in range(fragments)]
    writer.hold(head)
    for part in parts:
        writer.write(memoryview(part))
    expected = head + b"".join(parts)
    assert writer.size == len(expected)
    with writer.reopen() as fp:
        assert fp.read() == expected
    ref = writer.commit()
    assert ref.sha256 == hashlib.sha256(expected).hexdigest()
    assert store.path(ref.sha256).read_bytes() == expected


def test_a_held_head_goes_to_the_file_in_the_same_write_as_the_first_fragment(tmp_path: Path, monkeypatch):
    from dicomgrid.core import blobstore

    store = BlobStore(tmp_path, "A")
    writer = blobstore.BlobWriter(store, None)
    calls: list[bytes] = []
    real_write = os.write

    def recording_write(fd: int, data) -> int:
        calls.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(blobstore.os, "write", recording_write)
    writer.hold(b"head")
    writer.write(b"first")
    writer.write(b"second")
    writer.commit()
    assert calls == [b"headfirst", b"second"]


def test_a_held_head_counts_against_the_size_limit(tmp_path: Path):
    from dicomgrid.core.blobstore import BlobWriter

    writer = BlobWriter(BlobStore(tmp_path, "A"), 10)
    writer.hold(b"12345678")
    with pytest.raises(PayloadTooLarge):
        writer.write(b"abc")
    writer.abort()
    assert not any((tmp_path / "tmp").iterdir())


MOUNTINFO = [
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n",
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n",
    "40 27 254:16 / /srv/pacs\\040archive rw,relatime shared:2 - xfs /dev/vdb rw\n",
    "41 40 0:50 / /srv/pacs\\040archive/nfs rw,relatime shared:3 - nfs4 server:/export rw\n",
]


@pytest.mark.parametrize("path, kind", [
    ("/srv/pacs archive/site-A/blobs", "xfs"),  # the innermost mount, its escaped space read back
    ("/srv/pacs archive/nfs/blobs", "nfs4"),
    ("/srv/pacs archived", "ext4"),  # a longer name is not inside the mount point
    ("/", "ext4"),
])
def test_the_filesystem_of_a_store_is_that_of_the_innermost_mount_holding_it(path: str, kind: str):
    assert mount_type(path, MOUNTINFO) == kind


def _directory_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    synced: list[str] = []
    real = blobstore._fsync_dir

    def record(path):
        synced.append(os.fspath(path))
        real(path)

    monkeypatch.setattr(blobstore, "_fsync_dir", record)
    return synced


@pytest.mark.parametrize("durable_with_file", [True, False])
def test_a_payloads_directory_is_fsynced_unless_the_files_fsync_commits_its_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable_with_file: bool):
    store = BlobStore(tmp_path, "A")
    store.entry_durable_with_file = durable_with_file
    data = b"a payload whose shard directory exists"
    final = store.path(hashlib.sha256(data).hexdigest())
    final.parent.mkdir(parents=True)
    synced = _directory_fsyncs(monkeypatch)
    store.put_bytes(data)
    assert final.read_bytes() == data
    assert synced == ([] if durable_with_file else [os.fspath(final.parent)])


@pytest.mark.parametrize("durable_with_file", [True, False])
def test_directories_made_for_a_payload_are_fsynced_unless_the_files_fsync_commits_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable_with_file: bool):
    store = BlobStore(tmp_path, "A")
    store.entry_durable_with_file = durable_with_file
    synced = _directory_fsyncs(monkeypatch)
    ref = store.put_bytes(b"the first payload of its shard")
    final = store.path(ref.sha256)
    assert final.read_bytes() == b"the first payload of its shard"
    # The payload's new shard directory, and the directories the new shard directories went in.
    made = [final.parent, final.parent.parent, final.parent.parent.parent]
    assert sorted(synced) == ([] if durable_with_file else sorted(os.fspath(d) for d in made))


def _sharing(digest: str, prefix: int, not_prefix: int | None = None) -> bytes:
    """Bytes whose digest starts as ``digest`` does for ``prefix`` hex digits (and not for ``not_prefix``)."""
    for n in range(10_000_000):
        got = hashlib.sha256(data := b"%d" % n).hexdigest()
        if got[:prefix] == digest[:prefix] and (not_prefix is None or got[:not_prefix] != digest[:not_prefix]):
            return data
    raise AssertionError("no such bytes")


def test_a_new_shard_costs_one_mkdir_and_a_shard_the_store_has_seen_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = BlobStore(tmp_path, "A")
    first = store.put_bytes(b"the first payload of its top-level directory")
    new_shard = _sharing(first.sha256, 2, not_prefix=4)  # same top-level directory, another shard
    calls: list[str] = []
    for name in ("mkdir", "makedirs", "stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    second = store.put_bytes(new_shard)
    assert calls == ["mkdir"]
    calls.clear()
    third = store.put_bytes(_sharing(second.sha256, 4))
    assert calls == []
    monkeypatch.undo()
    assert store.path(third.sha256).parent == store.path(second.sha256).parent != store.path(first.sha256).parent
    assert all(store.verify(ref.sha256) for ref in (first, second, third))


def test_a_store_opened_again_recognises_what_its_existing_shards_hold(tmp_path: Path):
    # A new process knows no shard yet: the one it finds existing is searched for the payload.
    BlobStore(tmp_path, "A").put_bytes(b"stored by an earlier process")
    with BlobStore(tmp_path, "A").writer() as writer:
        writer.write(b"stored by an earlier process")
        ref = writer.commit()
    assert writer.existed and BlobStore(tmp_path, "A").verify(ref.sha256)


def test_a_shard_directory_that_cannot_be_made_refuses_the_payload_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = BlobStore(tmp_path, "A")
    kept = store.put_bytes(b"stored before the disk filled up")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "mkdir", full)
    monkeypatch.setattr(os, "makedirs", full)
    with pytest.raises(BlobStoreError, match="No space left"):
        store.put_bytes(_sharing(kept.sha256, 0, not_prefix=2))  # a new top-level shard
    monkeypatch.undo()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.verify(kept.sha256)
    # The shard was not remembered: once there is room, the payload is stored.
    assert store.verify(store.put_bytes(_sharing(kept.sha256, 0, not_prefix=2)).sha256)

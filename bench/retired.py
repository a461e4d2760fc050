"""Stores and output directories the benchmark is done with: moved aside while anything is measured,
deleted when the session ends.

ext4 does not reuse an inode soon after it is freed: on every file creation its allocator scans past each
free inode whose deletion time is under a minute old (five minutes while that inode's table block is
still dirty), with a buffer-cache look-up for each (``recently_deleted()`` in ``fs/ext4/ialloc.c``).
After a few thousand files are deleted, every file created on that disk costs several times the kernel
CPU until they age out. Measured here: a 40 KB file written and fsynced took 0.11 ms of system time on
a quiet disk, 0.71 ms just after 20,000 files were deleted; a profile of the grid's receiver in a run
that followed a deleted store spent a third of its samples in that scan. A target measured then is
measured on what the harness deleted, not on its own code, and which target pays depends on the order
of the runs.

So nothing is deleted during a session: :func:`retire` renames a directory into :data:`RETIRED` (one
rename, no inode freed), :func:`purge` deletes what was retired when the session ends, and a session
waits until :data:`RECENTLY_DELETED_S` have passed since the last purge before it measures
(:func:`wait_since_purge`).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from bench.paths import BENCH_ROOT

RETIRED = BENCH_ROOT / "retired"
# When the last purge ended (its modification time).
PURGED = BENCH_ROOT / "retired.purged"
# The longest an ext4 inode counts as recently deleted (RECENTCY_DIRTY in fs/ext4/ialloc.c).
RECENTLY_DELETED_S = 300.0


def retire(path: Path) -> None:
    """Move ``path`` (a directory) out of the way without deleting it; a missing path is left alone."""
    if not path.exists():
        return
    RETIRED.mkdir(parents=True, exist_ok=True)
    try:
        path.rename(RETIRED / f"{path.name}-{time.time_ns()}")
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # On another file system than the bench's (a store configured elsewhere): nothing to spare.
        shutil.rmtree(path, ignore_errors=True)


def purge() -> None:
    """Delete everything retired (at the end of a session, once nothing is measured any more)."""
    if not RETIRED.exists() or not any(RETIRED.iterdir()):
        return
    shutil.rmtree(RETIRED, ignore_errors=True)
    PURGED.touch()


def since_purge() -> float | None:
    """Seconds since the last purge ended, or None if there has been none."""
    try:
        return max(0.0, time.time() - os.stat(PURGED).st_mtime)
    except FileNotFoundError:
        return None


def wait_since_purge(max_wait_s: float) -> float:
    """Sleep until the last purge's inodes are no longer recently deleted (at most ``max_wait_s``);
    returns the seconds waited."""
    since = since_purge()
    if since is None or since >= RECENTLY_DELETED_S:
        return 0.0
    wait = min(RECENTLY_DELETED_S - since, max_wait_s)
    time.sleep(wait)
    return wait

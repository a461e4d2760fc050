"""Where a receiver streams the data sets it is being sent, and how what is left there gets removed.

pynetdicom writes each received data set to a temporary file before the C-STORE handler sees it. A
file whose association dies mid-transfer is the receiver's to delete (see ``core.dimse``); this module
finds whatever escaped that: files of receivers that were killed, or that were never claimed.

Each receiver process spools into a folder of its own, ``incoming/receiver-<pid>-<start time>``, so any
process can tell a folder whose owner is gone (remove it whole) from one whose owner is still
receiving (leave it to that owner). STOW-RS spools to unnamed files (``O_TMPFILE``) in ``incoming/``,
which the kernel frees when the HTTP service closes them or dies, so they need no sweep.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from dicomgrid.core.logging import get_logger
from dicomgrid.core.processes import tag_alive, tag_of

log = get_logger(__name__)

# A spooled file nobody claims is left alone this long: it may have been created an instant before the
# association that owns it recorded it.
UNCLAIMED_GRACE_S = 30.0
_PREFIX = "receiver-"


def _process_folder_name(pid: int, started: float) -> str:
    return f"{_PREFIX}{tag_of(pid, started)}"


def _owner_alive(name: str) -> bool:
    """Whether the receiver that named a spool folder is still running."""
    return tag_alive(name.removeprefix(_PREFIX))


class ReceiveSpool:
    """The spool of one receiver process: ``root/receiver-<pid>-<start>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        me = psutil.Process()
        self.dir = root / _process_folder_name(me.pid, me.create_time())

    def create(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir

    def sweep(self, claimed: Iterable[Path] = (), grace_s: float = UNCLAIMED_GRACE_S) -> int:
        """Remove leftovers; returns how many files went.

        * this process's files that no live association claims (older than ``grace_s``);
        * the folders of receivers that are no longer running, whole;
        * ``*.dcm`` files directly in the root (older than ``grace_s``), left by receivers of earlier
          versions, which spooled there.
        """
        claimed = set(claimed)
        cutoff = time.time() - grace_s
        removed = 0
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry == self.dir:
                    removed += sum(_unlink_if(f, f not in claimed and _older(f, cutoff)) for f in entry.iterdir())
                elif entry.is_dir() and entry.name.startswith(_PREFIX):
                    if not _owner_alive(entry.name):
                        removed += sum(1 for _ in entry.iterdir())
                        shutil.rmtree(entry, ignore_errors=True)
                elif entry.suffix == ".dcm" and entry.is_file():
                    removed += _unlink_if(entry, _older(entry, cutoff))
            except FileNotFoundError:  # another receiver swept it first
                continue
        if removed:
            log.warning("removed leftover spool files", files=removed, spool=str(self.root))
        return removed


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _unlink_if(path: Path, condition: bool) -> int:
    if not condition:
        return 0
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0

"""A site's audit records kept on its own disk until Kafka has confirmed them (at-least-once delivery).

Each process appends every record to a file of its own (``<spool>/<pid>-<id>.jsonl``, locked while the
process lives) before publishing it, and forgets it once the brokers confirm it; a file whose records
have all been confirmed is removed. What Kafka refused is sent again; what a process that died left
behind is adopted by the next process of the site to start, and sent. Appends are written at once and
fsynced every second: a killed process loses nothing, a machine that loses power at most the last
second. A record may so reach Kafka twice; the audit chain keeps it once (by its event ID).

The file of a live process keeps the lines of what was confirmed until it is rotated. When a record that
covers held records (:meth:`~dicomgrid.core.audit.AuditTrail.hold`) is confirmed, a line says so
(:meth:`AuditSpool.confirmed`), and adoption sends neither it nor them again: sent again under their own
event IDs, the held records would name every instance a second time.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

# A spool file whose records are all confirmed is replaced by a new one once it has grown this large.
ROTATE_BYTES = 1 << 20


class AuditSpool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._records: dict[str, tuple[Path, dict[str, Any]]] = {}  # undelivered, by event ID
        self._waiting: set[str] = set()  # undelivered and not on their way to Kafka right now
        self._per_file: dict[Path, set[str]] = {}
        self._dirty = False
        self._adopt_orphans()
        self._fh, self._path = self._new_file()

    def _new_file(self) -> tuple[BinaryIO, Path]:
        path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
        fh = path.open("ab")
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._per_file[path] = set()
        return fh, path

    def _adopt_orphans(self) -> None:
        """Take over the files of processes that are gone (their lock went with them)."""
        for path in sorted(self.directory.glob("*.jsonl")):
            try:
                fh = path.open("rb")
            except FileNotFoundError:
                continue
            with fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process's own spool
                records, confirmed = [], set()
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        log.error("unreadable line in an audit spool file skipped", file=path.name)
                        continue
                    if "event_id" in entry:
                        records.append(entry)
                    else:
                        confirmed.update(entry.get("confirmed", ()))
            records = [record for record in records if record["event_id"] not in confirmed]
            if not records:
                path.unlink(missing_ok=True)
                continue
            ids = set()
            for record in records:
                self._records[record["event_id"]] = (path, record)
                self._waiting.add(record["event_id"])
                ids.add(record["event_id"])
            self._per_file[path] = ids
            log.warning("audit records of a stopped process adopted, to be sent", file=path.name, records=len(ids))

    def append(self, record: dict[str, Any]) -> str:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        token = record["event_id"]
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            self._dirty = True
            self._records[token] = (self._path, record)
            self._per_file[self._path].add(token)
        return token

    def confirmed(self, token: str, covered: Iterable[str]) -> None:
        """Kafka has ``token``'s record, which covers the held records ``covered``: noted in its file (call
        before :meth:`delivered`), so that a process adopting the file sends none of them again."""
        line = json.dumps({"confirmed": [token, *covered]}, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            entry = self._records.get(token)
            if entry is None or entry[0] != self._path:
                return  # an adopted file: its records were sent as they were, covering nothing
            self._fh.write(line)
            self._fh.flush()
            self._dirty = True

    def delivered(self, token: str) -> None:
        with self._lock:
            entry = self._records.pop(token, None)
            self._waiting.discard(token)
            if entry is None:
                return
            path = entry[0]
            ids = self._per_file.get(path, set())
            ids.discard(token)
            if ids:
                return
            if path != self._path:
                self._per_file.pop(path, None)
                path.unlink(missing_ok=True)
            elif self._fh.tell() > ROTATE_BYTES:
                self._fh.close()
                self._per_file.pop(path, None)
                path.unlink(missing_ok=True)
                self._fh, self._path = self._new_file()

    def failed(self, token: str) -> None:
        with self._lock:
            if token in self._records:
                self._waiting.add(token)

    def undelivered(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Records to send again (each is handed out once until it fails again)."""
        with self._lock:
            due = [(token, self._records[token][1]) for token in list(self._waiting) if token in self._records]
            self._waiting.clear()
        yield from due

    def pending(self) -> int:
        with self._lock:
            return len(self._records)

    def sync(self) -> None:
        with self._lock:
            if self._dirty:
                os.fsync(self._fh.fileno())
                self._dirty = False

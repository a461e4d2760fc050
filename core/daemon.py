"""Detached daemons known by pid files: start in a new session, recognise, stop, show their logs.

Shared by the local cluster (JVMs) and the grid supervisor (site services).
"""

from __future__ import annotations

import subprocess
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from dicomgrid.core.logging import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, rotate_if_large

# psutil derives process start times from the boot time, which /proc/stat gives in whole seconds.
_CLOCK_SLACK_S = 1.0


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file, or "" if it does not exist."""
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except FileNotFoundError:
        return ""


@dataclass(frozen=True)
class Daemon:
    """One detached process of ours, known by its pid file."""

    name: str
    pid_file: Path
    log_file: Path  # written by the process's logging framework (log4j2, logback, Python logging)
    out_file: Path  # its stdout/stderr: start-up crashes and uncaught tracebacks land here
    # The console output is appended across restarts, and rotated before a start once this large.
    out_max_bytes: int = DEFAULT_MAX_BYTES
    out_backups: int = DEFAULT_BACKUPS

    def pid(self) -> int | None:
        """The pid of our running process, or None.

        The pid file is written right after the process starts, so a process created later holds
        a pid the system recycled after ours died: it is not ours, and is never signalled.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
            written = self.pid_file.stat().st_mtime
            proc = psutil.Process(pid)
            if _gone(proc):
                return None
            return pid if proc.create_time() <= written + _CLOCK_SLACK_S else None
        except (FileNotFoundError, ValueError, psutil.Error):
            return None

    def stale(self) -> bool:
        """A pid file is left but its process is gone (it crashed or was killed)."""
        return self.pid_file.exists() and self.pid() is None

    def start(self, argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session, so it outlives the caller and its terminal.

        Its console output is appended to ``out_file``: what the previous run printed before it crashed
        is what explains the crash.
        """
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        rotate_if_large(self.out_file, self.out_max_bytes, self.out_backups)
        with self.out_file.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc

    def stop(self, grace: float) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; forget the pid file."""
        pid = self.pid()
        if pid is not None:
            try:
                proc = psutil.Process(pid)
                proc.terminate()
                if not _wait_gone(proc, grace):
                    proc.kill()
                    _wait_gone(proc, 10)
            except psutil.NoSuchProcess:
                pass
        self.pid_file.unlink(missing_ok=True)

    def excerpt(self, since: float = 0.0, lines: int = 30) -> str:
        """The end of the console output and of the log, for error messages.

        Files untouched since ``since`` (a time.time() value) are left out: a JVM that dies on its
        command line never reaches its log, whose tail would then be an older run's shutdown.
        """
        parts = []
        for path in (self.out_file, self.log_file):
            if path.exists() and path.stat().st_mtime >= since:
                text = tail(path, lines).rstrip()
                if text:
                    parts.append(f"last {lines} lines of {path}:\n{text}")
        return "\n".join(parts) or f"nothing logged in {self.out_file} or {self.log_file}"


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    """Wait for ``proc`` to exit. A zombie counts as gone: when its parent is init (the starting
    CLI has exited), it may be reaped only a while later; one whose other threads still run is not
    gone (:func:`_gone`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _gone(proc):
                with suppress(psutil.TimeoutExpired):
                    proc.wait(timeout=0)  # reaps it when it is our own child
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _gone(proc: psutil.Process) -> bool:
    """A zombie whose threads have all exited. The kernel shows a process as a zombie as soon as its
    main thread has exited, and a JVM's launcher thread exits before the threads that run its shutdown
    hooks and still hold its ports."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE and proc.num_threads() <= 1
    except psutil.NoSuchProcess:
        return True

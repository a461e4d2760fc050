"""Detached JVM processes: finding Java, starting, recognising and stopping our daemons, ports."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from .errors import InfraError
from .files import tail

MIN_JAVA = 17  # Kafka 4 brokers need 17; Cassandra 5.0 runs on 11 or 17.
_ANY_ADDRESS = {"0.0.0.0", "::"}
# psutil derives process start times from the boot time, which /proc/stat gives in whole seconds.
_CLOCK_SLACK_S = 1.0


def java_binary() -> str:
    """The ``java`` launcher to use ($JAVA_HOME/bin/java, else PATH), checked to be Java 17+."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home, "bin", "java")) if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise InfraError("java not found: install openjdk-17-jre-headless (or set JAVA_HOME)")
    banner = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', banner)
    if not match or int(match.group(1)) < MIN_JAVA:
        first = banner.splitlines()[0] if banner else "no version banner"
        raise InfraError(
            f"{java} is not Java {MIN_JAVA}+ ({first}): install openjdk-17-jre-headless or set JAVA_HOME"
        )
    return java


@dataclass(frozen=True)
class Daemon:
    """One detached process of ours, known by its pid file."""

    name: str
    pid_file: Path
    log_file: Path  # written by the JVM's logging framework
    out_file: Path  # the JVM's stdout/stderr: start-up crashes land here

    def pid(self) -> int | None:
        """The pid of our running process, or None.

        The pid file is written right after the process starts, so a process created later holds
        a pid the system recycled after ours died: it is not ours, and is never signalled.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
            written = self.pid_file.stat().st_mtime
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return pid if proc.create_time() <= written + _CLOCK_SLACK_S else None
        except (FileNotFoundError, ValueError, psutil.Error):
            return None

    def stale(self) -> bool:
        """A pid file is left but its process is gone (it crashed or was killed)."""
        return self.pid_file.exists() and self.pid() is None

    def start(self, argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session, so it outlives the caller and its terminal."""
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        with self.out_file.open("wb") as out:
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


class Component(Protocol):
    """What the cluster needs from a Kafka broker or a Cassandra node."""

    name: str
    kind: str  # which jar set it runs on: "kafka" or "cassandra"
    version: str
    address: str  # host:port that clients use
    daemon: Daemon

    def listen_addresses(self) -> list[tuple[str, int]]:
        """Every (host, port) it binds, the client port first."""
        ...

    def prepare(self, java: str, lib: Path) -> tuple[list[str], Path]:
        """Write its config files (and initialise storage); return (argv, working directory)."""
        ...


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    """Wait for ``proc`` to exit. A zombie counts as gone: when its parent is init (the starting
    CLI has exited), it may be reaped only a while later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                with suppress(psutil.TimeoutExpired):
                    proc.wait(timeout=0)  # reaps it when it is our own child
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def listener_pid(host: str, port: int) -> int | None:
    """The pid listening on host:port (0 if the socket's owner is not visible to us), or None."""
    for conn in psutil.net_connections(kind="tcp"):
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.laddr.port == port
            and (conn.laddr.ip in _ANY_ADDRESS or conn.laddr.ip.removeprefix("::ffff:") == host)
        ):
            return conn.pid or 0
    return None


def ensure_ports_free(component: Component) -> None:
    """Refuse to start a component whose ports another process already holds."""
    for host, port in component.listen_addresses():
        pid = listener_pid(host, port)
        if pid is not None:
            owner = f"pid {pid}" if pid else "another user's process"
            raise InfraError(
                f"port {host}:{port} is in use by {owner} (not ours), so {component.name} cannot "
                f"start: stop that process or change the [infra] ports in the grid config"
            )


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` so that two processes never start or stop nodes at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

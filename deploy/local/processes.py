"""Detached JVM processes: finding Java, starting, recognising and stopping our daemons, ports."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import psutil

from dicomgrid.core.daemon import Daemon

from .errors import InfraError

MIN_JAVA = 17  # Kafka 4 brokers need 17; Cassandra 5.0 runs on 11 or 17.
_ANY_ADDRESS = {"0.0.0.0", "::"}


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

"""The local Apache Kafka: one KRaft node (broker and controller in one JVM) on 127.0.0.1."""

from __future__ import annotations

import base64
import socket
import subprocess
import uuid
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from dicomgrid.core.config import GridConfig

from .errors import InfraError
from .files import render_template
from dicomgrid.core.daemon import Daemon

HOST = "127.0.0.1"
_MAIN = "kafka.Kafka"
_STORAGE_TOOL = "kafka.tools.StorageTool"


def site_broker_port(config: GridConfig, site: str) -> int:
    """The client port of site ``site``'s local broker, from its ``kafka_bootstrap_servers``
    (which must name one address on 127.0.0.1 for the local launcher to run it)."""
    servers = config.site(site).kafka_bootstrap_servers or ""
    host, _, port = servers.strip().rpartition(":")
    if "," in servers or host != HOST or not port.isdigit():
        raise InfraError(
            f"site {site}'s kafka_bootstrap_servers = {servers!r}: the local launcher runs a site's broker "
            f"only on one {HOST}:PORT address"
        )
    return int(port)


class KafkaNode:
    """Config files, storage, command line and health probe of a local broker: the grid's shared one,
    or (``site`` given) the broker of one site's own cluster."""

    name = "kafka"
    kind = "kafka"

    def __init__(self, config: GridConfig, site: str | None = None) -> None:
        infra = config.infra
        self.version = infra.kafka_version
        if site is None:
            self.heap = infra.kafka_heap
            self.port = infra.kafka_port
            self.controller_port = infra.kafka_controller_port
            base = config.root
        else:
            self.name = f"kafka-{site}"
            self.heap = infra.kafka_site_heap
            self.port = site_broker_port(config, site)
            self.controller_port = self.port + 1
            base = config.infra_dir
        self.site = site
        self.address = f"{HOST}:{self.port}"
        self.home = base / self.name
        self.data_dir = self.home / "data"
        self.properties = self.home / "conf" / "server.properties"
        self.log_config = self.home / "conf" / "log4j2.properties"
        self.daemon = Daemon(
            name=self.name,
            pid_file=base / "run" / f"{self.name}.pid",
            log_file=base / "logs" / f"{self.name}.log",
            out_file=base / "logs" / f"{self.name}.out",
        )
        # The probe talks to this broker with the grid's client settings.
        self._client_config = {**config.kafka.client_config(), "bootstrap.servers": self.address}

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, self.port), (HOST, self.controller_port)]

    def prepare(self, java: str, lib: Path) -> tuple[list[str], Path]:
        render_template(
            "server.properties", self.properties,
            host=HOST, port=self.port, controller_port=self.controller_port, data_dir=self.data_dir,
        )
        render_template("log4j2.properties", self.log_config, log_file=self.daemon.log_file)
        # Classpath and logging, shared by the storage tool and the broker.
        shared = ["-cp", f"{lib}/*", f"-Dlog4j2.configurationFile={self.log_config}"]
        if not (self.data_dir / "meta.properties").exists():
            self._format(java, shared)
        argv = [
            java, f"-Xms{self.heap}", f"-Xmx{self.heap}",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true",
            *shared, _MAIN, str(self.properties),
        ]
        return argv, self.home

    def _format(self, java: str, shared: list[str]) -> None:
        """Write the KRaft metadata (cluster id, voter set) into an empty log dir, once."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [java, *shared, _STORAGE_TOOL, "format", "-t", _cluster_id(), "-c", str(self.properties)],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise InfraError(
                f"formatting Kafka storage in {self.data_dir} failed (exit code {done.returncode}):\n"
                f"{(done.stdout + done.stderr).strip()}"
            )

    def probe(self, timeout: float) -> tuple[bool, str]:
        """Whether the broker answers a metadata request, and a one-line description."""
        try:
            # A refused connection fails at once; librdkafka would retry until the timeout.
            socket.create_connection((HOST, self.port), timeout=timeout).close()
        except OSError:
            return False, "broker not answering (connection refused)"
        admin = AdminClient({**self._client_config, "log_level": 0})
        try:
            metadata = admin.list_topics(timeout=timeout)
        except KafkaException:
            return False, "broker accepts connections but does not answer metadata requests"
        topics = [t for t in metadata.topics if not t.startswith("__")]
        return True, f"broker answering, {len(topics)} topics"


def _cluster_id() -> str:
    """A KRaft cluster id as Kafka makes them: a random UUID, URL-safe base64, never starting
    with '-' (which command lines would take for an option)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text

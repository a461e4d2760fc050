"""The local Apache Cassandra: node i is the only node of datacenter ``dc<i>`` and listens on 127.0.0.i.

All of 127.0.0.0/8 is loopback on Linux, so every node uses the same ports on its own address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cassandra import DriverException
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.pool import Host
from cassandra.policies import WhiteListRoundRobinPolicy

from dicomgrid.core.config import GridConfig

from .files import render_template
from .jars import find_jar
from dicomgrid.core.daemon import Daemon

_MAIN = "org.apache.cassandra.service.CassandraDaemon"
_MIN_TOKEN = -(2**63)
_RACK = "rack1"

# From Cassandra 5.0's conf/jvm17-server.options: on Java 17 the node dies at start without them.
_EXPORTS = (
    "java.base/jdk.internal.misc", "java.base/java.lang.ref", "java.rmi/sun.rmi.registry",
    "java.rmi/sun.rmi.server", "java.management.rmi/com.sun.jmx.remote.internal.rmi", "java.sql/java.sql",
    "jdk.unsupported/sun.misc", "jdk.compiler/com.sun.tools.javac.file", "jdk.attach/sun.tools.attach",
)
_OPENS = (
    "java.base/java.lang", "java.base/java.lang.module", "java.base/java.lang.reflect", "java.base/java.io",
    "java.base/java.util", "java.base/jdk.internal.loader", "java.base/jdk.internal.ref",
    "java.base/jdk.internal.reflect", "java.base/jdk.internal.math", "java.base/jdk.internal.module",
    "java.base/jdk.internal.util.jar", "java.base/sun.nio.ch", "jdk.management/com.sun.management.internal",
    "jdk.compiler/com.sun.tools.javac",
)
_JAVA17_FLAGS = (
    "-Djdk.attach.allowAttachSelf=true",
    *(f"--add-exports={package}=ALL-UNNAMED" for package in _EXPORTS),
    *(f"--add-opens={package}=ALL-UNNAMED" for package in _OPENS),
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
)
_GC_FLAGS = (
    "-XX:+UseG1GC", "-XX:+ParallelRefProcEnabled", "-XX:MaxGCPauseMillis=300", "-Xss256k",
    "-XX:+PerfDisableSharedMem", "-XX:+ExitOnOutOfMemoryError",
)


class CassandraNode:
    """Config files, command line and identity of one local Cassandra node."""

    kind = "cassandra"

    def __init__(self, config: GridConfig, index: int) -> None:
        infra = config.infra
        self.index = index
        self.dc = f"dc{index}"
        self.name = f"cassandra-{self.dc}"
        self.host = f"127.0.0.{index}"
        self.version = infra.cassandra_version
        self.heap = infra.cassandra_heap
        self.cluster_name = infra.cassandra_cluster_name
        self.native_port = config.cassandra.port
        self.storage_port = infra.cassandra_storage_port
        self.jmx_port = infra.cassandra_jmx_port + index - 1
        self.address = f"{self.host}:{self.native_port}"
        self.home = config.root / "cassandra" / self.dc
        self.conf_dir = self.home / "conf"
        self.daemon = Daemon(
            name=self.name,
            pid_file=config.root / "run" / f"{self.name}.pid",
            log_file=config.root / "logs" / f"{self.name}.log",
            out_file=config.root / "logs" / f"{self.name}.out",
        )

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [(self.host, self.native_port), (self.host, self.storage_port), ("127.0.0.1", self.jmx_port)]

    def prepare(self, java: str, lib: Path) -> tuple[list[str], Path]:
        yaml = render_template(
            "cassandra.yaml", self.conf_dir / "cassandra.yaml",
            index=self.index, dc=self.dc, cluster_name=self.cluster_name, home=self.home,
            initial_token=_MIN_TOKEN + (self.index - 1) * 100, host=self.host,
            storage_port=self.storage_port, native_port=self.native_port,
            seeds=f"127.0.0.1:{self.storage_port}",
        )
        rackdc = render_template(
            "cassandra-rackdc.properties", self.conf_dir / "cassandra-rackdc.properties",
            dc=self.dc, rack=_RACK,
        )
        logback = render_template(
            "logback.xml", self.conf_dir / "logback.xml", dc=self.dc, log_file=self.daemon.log_file
        )
        argv = [
            java, f"-Xms{self.heap}", f"-Xmx{self.heap}", *_GC_FLAGS, *_JAVA17_FLAGS,
            f"-javaagent:{find_jar(lib, 'jamm')}",
            f"-Dcassandra.config={yaml.as_uri()}",
            f"-Dcassandra-rackdc.properties={rackdc.as_uri()}",
            f"-Dlogback.configurationFile={logback}",
            f"-Dcassandra.storagedir={self.home}",
            # Local JMX only (for nodetool); each node needs its own port since all bind 127.0.0.1.
            f"-Dcassandra.jmx.local.port={self.jmx_port}",
            "-Dcassandra-foreground=yes",
            # No peers to wait for in a fresh development cluster: join at once.
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            # Peers are on loopback: half a second is plenty to tell them "shutting down" (default 2 s).
            "-Dcassandra.shutdown_announce_in_ms=500",
            "-Djava.net.preferIPv4Stack=true",
            "-cp", f"{lib}/*", _MAIN,
        ]
        return argv, self.home


def probe_nodes(nodes: Sequence[CassandraNode], timeout: float) -> dict[str, tuple[bool, str]]:
    """Ask the cluster over CQL which of ``nodes`` are up: (healthy, detail) by node name.

    A node is healthy when the driver reaches its native transport, it reports the expected
    datacenter, and it and every other answering node have an open internode connection to each
    other (the gossip view: without it a cross-datacenter write would fail as unavailable).
    """
    if not nodes:
        return {}
    results = {node.name: (False, "native transport not answering") for node in nodes}
    links: dict[str, set[str]] = {}  # node address -> addresses it has internode connections to
    hosts = [node.host for node in nodes]
    with _quiet_driver():
        cluster = Cluster(
            contact_points=hosts,
            port=nodes[0].native_port,
            protocol_version=5,
            connect_timeout=timeout,
            control_connection_timeout=timeout,
            idle_heartbeat_interval=0,
            schema_metadata_enabled=False,
            token_metadata_enabled=False,
            execution_profiles={
                # Whitelisting every node makes each one LOCAL, so the driver opens a pool to each.
                EXEC_PROFILE_DEFAULT: ExecutionProfile(
                    load_balancing_policy=WhiteListRoundRobinPolicy(hosts), request_timeout=timeout
                )
            },
        )
        try:
            session = cluster.connect()
            pooled = _pooled_hosts(cluster, session, set(hosts), time.monotonic() + timeout)
            for node in nodes:
                if node.host in pooled:
                    results[node.name], peers = _ask(session, pooled[node.host], node)
                    if peers is not None:
                        links[node.host] = peers
        except (NoHostAvailable, DriverException, OSError):
            return results
        finally:
            cluster.shutdown()

    for node in nodes:
        if node.host not in links:
            continue
        unseen_by = [
            peer.dc for peer in nodes
            if peer is not node and peer.host in links and node.host not in links[peer.host]
        ]
        if unseen_by:
            results[node.name] = (
                False, f"answers, but no internode connection from {', '.join(unseen_by)} yet (gossip)"
            )
    return results


def _pooled_hosts(
    cluster: Cluster, session: Session, addresses: set[str], deadline: float
) -> dict[str, Host]:
    """Our hosts with an open connection pool, by address.

    ``connect()`` returns as soon as the first pool is open; wait (until ``deadline``) for the
    others to open or for the driver to mark their hosts down.
    """
    while True:
        pooled = session.get_pool_state()
        ours = [h for h in cluster.metadata.all_hosts() if h.address in addresses]
        if time.monotonic() >= deadline or not any(h.is_up and h not in pooled for h in ours):
            return {h.address: h for h in ours if h.is_up and h in pooled}
        time.sleep(0.02)


def _ask(session: Session, host: Host, node: CassandraNode) -> tuple[tuple[bool, str], set[str] | None]:
    """One node's own verdict, and the addresses it holds internode connections to (None if it
    does not answer)."""
    try:
        local = session.execute("SELECT data_center, release_version FROM system.local", host=host).one()
        outbound = session.execute(
            "SELECT address, active_connections FROM system_views.internode_outbound", host=host
        )
    except (DriverException, NoHostAvailable) as exc:
        return (False, f"native transport not answering queries ({type(exc).__name__})"), None
    if local.data_center != node.dc:
        return (False, f"answers as datacenter {local.data_center!r}, expected {node.dc!r}"), None
    links = {row.address for row in outbound if row.active_connections}
    return (True, f"{node.dc} up, Cassandra {local.release_version}"), links


@contextmanager
def _quiet_driver() -> Iterator[None]:
    """Silence the driver's connection warnings (with tracebacks) while probing nodes that may be
    down: the probe's result already says so, in one line."""
    driver_log = logging.getLogger("cassandra")
    level = driver_log.level
    driver_log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        driver_log.setLevel(level)

"""Apache Kafka's MirrorMaker 2 between the sites' own Kafka clusters: one dedicated MM2 process.

Run when every site has a Kafka cluster of its own (``sites[].kafka_bootstrap_servers``): the process
is ``org.apache.kafka.connect.mirror.MirrorMaker`` (what ``connect-mirror-maker.sh`` starts) from the
``connect-mirror`` artifact of the broker's Kafka version, with an ``mm2.properties`` generated from
the grid config on every start. Every ordered pair of sites is a flow (``A->B``, ``B->A``) carrying the
grid's topics only, under MirrorMaker's DefaultReplicationPolicy: topic ``T`` of site A's cluster is
``A.T`` in site B's. A topic is never mirrored back (``A.T`` is not one of the grid's topics, and the
policy refuses cycles). docs/events.md describes the naming and the offsets.
"""

from __future__ import annotations

import re
from pathlib import Path

from dicomgrid import schemas
from dicomgrid.core.config import GridConfig
from dicomgrid.core.daemon import Daemon
from dicomgrid.core.kafka import last_record_age_s

from .files import render_template
from .kafka import HOST, site_broker_port

MAIN = "org.apache.kafka.connect.mirror.MirrorMaker"
HEARTBEATS_TOPIC = "heartbeats"
# Heartbeats are emitted every second; a flow whose newest one is older than this is not mirroring.
HEALTHY_HEARTBEAT_AGE_S = 6.0


def topic_filter(config: GridConfig) -> str:
    """MM2's ``topics`` setting: the grid's physical topics, each an exact (Java) regex."""
    return ",".join(re.sub(r"\.", "[.]", config.kafka.topic(name)) for name in sorted(schemas.topics()))


def mm2_properties(config: GridConfig) -> str:
    """The MirrorMaker 2 configuration for the grid's sites (every ordered pair is a flow)."""
    sites = [s.name for s in config.sites]
    aliases = {s: config.mirror_alias(s) for s in sites}
    lines = [
        "# MirrorMaker 2 of the local dicomgrid sites. Generated from the grid config on every start.",
        f"clusters = {', '.join(aliases.values())}",
    ]
    for site in sites:
        lines.append(f"{aliases[site]}.bootstrap.servers = {config.site_kafka(site).bootstrap_servers}")
    topics = topic_filter(config)
    for source in sites:
        for target in sites:
            if source != target:
                lines += [f"{aliases[source]}->{aliases[target]}.enabled = true",
                          f"{aliases[source]}->{aliases[target]}.topics = {topics}"]
    lines += [
        "replication.policy.class = org.apache.kafka.connect.mirror.DefaultReplicationPolicy",
        # One broker per site: every topic MirrorMaker makes (mirrored topics, its internal ones) has one replica.
        "replication.factor = 1",
        "checkpoints.topic.replication.factor = 1",
        "heartbeats.topic.replication.factor = 1",
        "offset-syncs.topic.replication.factor = 1",
        "offset.storage.replication.factor = 1",
        "status.storage.replication.factor = 1",
        "config.storage.replication.factor = 1",
        "tasks.max = 1",
        # The grid's topics exist before MirrorMaker starts (schema apply); look again often anyway.
        "refresh.topics.interval.seconds = 10",
        "refresh.groups.interval.seconds = 30",
        "emit.heartbeats.interval.seconds = 1",
        "emit.checkpoints.interval.seconds = 5",
        # Consumer groups are site-local: no group moves between clusters, so none is synced (the
        # checkpoints still let RemoteClusterUtils.translateOffsets translate one if ever needed).
        f"groups = {re.sub(r'[.]', '[.]', config.name)}-.*",
        "sync.group.offsets.enabled = false",
        "sync.topic.acls.enabled = false",
        # The grid's topics carry acks=all events; mirrored ones are written the same way.
        "producer.override.acks = all",
        # One process: no REST listener between MirrorMaker nodes.
        "dedicated.mode.enable.internode.rest = false",
        "",
    ]
    return "\n".join(lines)


class MirrorMakerNode:
    """Config files, command line and health probe of the dedicated MirrorMaker 2 process."""

    name = "mirrormaker"
    kind = "mirrormaker"

    def __init__(self, config: GridConfig) -> None:
        self.config = config
        infra = config.infra
        self.version = infra.kafka_version  # connect-mirror of the brokers' Kafka version
        self.heap = infra.mirrormaker_heap
        self.sites = [s.name for s in config.sites]
        self.address = "<->".join(config.mirror_alias(s) for s in self.sites)
        base = config.infra_dir
        self.home = base / self.name
        self.properties = self.home / "conf" / "mm2.properties"
        self.log_config = self.home / "conf" / "log4j2.properties"
        self.daemon = Daemon(
            name=self.name,
            pid_file=base / "run" / f"{self.name}.pid",
            log_file=base / "logs" / f"{self.name}.log",
            out_file=base / "logs" / f"{self.name}.out",
        )

    def listen_addresses(self) -> list[tuple[str, int]]:
        return []  # no REST listener (dedicated.mode.enable.internode.rest = false)

    def brokers(self) -> list[tuple[str, int]]:
        return [(HOST, site_broker_port(self.config, s)) for s in self.sites]

    def prepare(self, java: str, lib: Path) -> tuple[list[str], Path]:
        self.properties.parent.mkdir(parents=True, exist_ok=True)
        self.properties.write_text(mm2_properties(self.config), encoding="utf-8")
        render_template("log4j2.properties", self.log_config, log_file=self.daemon.log_file)
        argv = [
            java, f"-Xms{self.heap}", f"-Xmx{self.heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", "-cp", f"{lib}/*", f"-Dlog4j2.configurationFile={self.log_config}",
            MAIN, str(self.properties),
        ]
        return argv, self.home

    def probe(self, timeout: float) -> tuple[bool, str]:
        """Healthy when every flow's newest heartbeat in its target cluster is recent."""
        stale = []
        for target in self.sites:
            age = last_record_age_s(self.config.site_kafka(target), HEARTBEATS_TOPIC, timeout=timeout)
            if age is None or age > HEALTHY_HEARTBEAT_AGE_S:
                stale.append(f"{target}: " + ("no heartbeat" if age is None else f"last heartbeat {age:.0f} s ago"))
        if stale:
            return False, "not mirroring (" + "; ".join(stale) + ")"
        return True, f"mirroring {' and '.join(f'{a}->{b}' for a in self.sites for b in self.sites if a != b)}"

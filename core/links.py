"""Whether each site can reach each other site: the WAN link as a site sees it.

With a Kafka cluster per site, events cross between sites by MirrorMaker 2, which writes a heartbeat a
second into every cluster it mirrors into and mirrors those onwards: the heartbeats of site B's cluster
reach site A's as ``B.heartbeats``, so a recent one there shows that both flows between A and B work.
Payloads cross over the other site's HTTP endpoint. A link is *partitioned* when either fails; the
site then goes on storing (its own blob store and Kafka), indexing (its own datacenter) and serving
what it has, while its new instances stay below ``min_copies`` until the link is back.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from dicomgrid.core.config import GridConfig
from dicomgrid.core.kafka import last_record_age_s

# MirrorMaker emits a heartbeat a second; one older than this means the flow is not mirroring.
STALE_HEARTBEAT_S = 6.0


@dataclass(frozen=True)
class Link:
    site: str
    peer: str
    heartbeat_age_s: float | None  # newest mirrored heartbeat of the peer's cluster; None: none at all
    peer_http: bool

    @property
    def mirroring(self) -> bool:
        return self.heartbeat_age_s is not None and self.heartbeat_age_s <= STALE_HEARTBEAT_S

    @property
    def partitioned(self) -> bool:
        return not (self.mirroring and self.peer_http)

    def describe(self) -> str:
        events = ("no events mirrored from it (no MirrorMaker heartbeat)" if self.heartbeat_age_s is None
                  else f"events mirrored {self.heartbeat_age_s:.0f} s ago")
        payloads = "its payload endpoint answers" if self.peer_http else "its payload endpoint does not answer"
        return f"{events}; {payloads}"


def _reachable(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def links(config: GridConfig, timeout: float = 3.0) -> list[Link]:
    """Every (site, peer) link of a grid with a Kafka cluster per site (none with one shared cluster)."""
    if not config.kafka_per_site:
        return []
    out = []
    for site in config.sites:
        for peer in config.sites:
            if peer.name == site.name:
                continue
            age = last_record_age_s(config.site_kafka(site.name), f"{config.mirror_alias(peer.name)}.heartbeats",
                                    timeout=timeout)
            out.append(Link(site.name, peer.name, age, _reachable(peer.http_host, peer.http_port, timeout)))
    return out


def partition_lines(config: GridConfig, timeout: float = 3.0) -> list[str]:
    """What ``dicomgrid status`` says about links that are down."""
    return [
        f"PARTITIONED: site {link.site} is cut off from site {link.peer} ({link.describe()}): {link.site} goes on "
        f"storing, indexing and serving what it has; its new instances stay below min_copies (Storage "
        f"Commitment reports them failed) until the link is back"
        for link in links(config, timeout) if link.partitioned
    ]

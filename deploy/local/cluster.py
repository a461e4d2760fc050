"""The local development cluster: one Kafka broker and one Cassandra node per datacenter.

Every operation is idempotent and works from any process: what runs is found through pid files
under ``<data dir>/run`` and, for health, over the network, so a cluster started by an earlier CLI
call (or by someone else on the same ports) is reported and reused rather than started twice.
"""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dicomgrid.core.config import GridConfig

from . import jars
from .cassandra import CassandraNode, probe_nodes
from .errors import InfraError
from .kafka import KafkaNode
from .mirrormaker import MirrorMakerNode
from .processes import Component, ensure_ports_free, java_binary, listener_pid, locked

PROBE_TIMEOUT_S = 3.0
POLL_INTERVAL_S = 1.0
# A Cassandra node drains (flushes memtables, closes internode connections) before exiting.
STOP_GRACE_S = 60.0
_CASSANDRA_NAME = re.compile(r"cassandra-dc([1-9])$")


@dataclass(frozen=True)
class ComponentStatus:
    """One component's health; ``detail`` says why it is down in words meant for a developer."""

    name: str
    healthy: bool
    detail: str
    pid: int | None
    address: str


@dataclass(frozen=True)
class ClusterStatus:
    """Health of every expected component, Kafka first, then Cassandra by datacenter."""

    components: list[ComponentStatus]

    @property
    def healthy(self) -> bool:
        return bool(self.components) and all(c.healthy for c in self.components)

    def component(self, name: str) -> ComponentStatus:
        for status in self.components:
            if status.name == name:
                return status
        raise KeyError(name)

    def render(self) -> str:
        """One line per component, e.g. ``cassandra-dc2  DOWN  127.0.0.2:9042  -  (no process)``."""
        width = max(len(c.name) for c in self.components) if self.components else 0
        lines = [
            f"{c.name:<{width}}  {'UP' if c.healthy else 'DOWN':<4}  {c.address:<15}  "
            f"{'pid ' + str(c.pid) if c.pid else '-':<10}  ({c.detail})"
            for c in self.components
        ]
        return "\n".join(lines)


class LocalCluster:
    """Start, inspect and stop the local cluster described by ``config.infra``."""

    def __init__(self, config: GridConfig) -> None:
        self.config = config
        self.dcs = config.infra.cassandra_dcs
        self._lock = config.root / "run" / "cluster.lock"

    # -- public API ---------------------------------------------------------------------------

    def up(self, dcs: int | None = None, timeout: float | None = None) -> ClusterStatus:
        """Start whatever is missing or dead, then wait until every component is healthy.

        Healthy components are left alone, and a process of ours that is still starting is
        waited for rather than started again. Raises InfraError with the log tail of a component
        that dies or is not healthy within ``timeout`` (default ``infra.start_timeout_s``).
        """
        if dcs is not None:
            if not 1 <= dcs <= 9:
                raise InfraError(f"dcs must be between 1 and 9, not {dcs}")
            self.dcs = dcs
        timeout = self.config.infra.start_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with locked(self._lock):
            status = self.status()
            pending = [c for c in self._components() if not status.component(c.name).healthy]
            to_start = [c for c in pending if c.daemon.pid() is None]
            for component in to_start:
                ensure_ports_free(component)
            since = time.time()
            # MirrorMaker connects to the sites' brokers as it starts: it starts once they serve.
            later = [c for c in to_start if isinstance(c, MirrorMakerNode)]
            first = [c for c in to_start if c not in later]
            started = self._start(first)
            if later:
                brokers = [c for c in pending if isinstance(c, KafkaNode)]
                self._wait_healthy(brokers, started, since, deadline, timeout, only=brokers)
                started |= self._start(later)
            return self._wait_healthy(pending, started, since, deadline, timeout)

    def down(self) -> None:
        """Stop every component of ours (SIGTERM, then SIGKILL after a grace period).

        Cassandra nodes stop one after the other, last datacenter first: a node draining while
        its peer disappears waits ~10 s for internode messages that cannot be delivered, so this
        is faster than stopping them together.
        """
        components = self._components()
        nodes = [c for c in components if isinstance(c, CassandraNode)]
        # MirrorMaker first: it would otherwise spend its grace period retrying brokers already gone.
        others = sorted((c for c in components if not isinstance(c, CassandraNode)),
                        key=lambda c: not isinstance(c, MirrorMakerNode))
        with locked(self._lock):
            for component in [*others, *reversed(nodes)]:
                component.daemon.stop(STOP_GRACE_S)

    def stop_node(self, component: str) -> None:
        """Stop one component ("kafka", "cassandra-dc2", ...) the way ``down`` does."""
        target = self._component(component)
        with locked(self._lock):
            if target.daemon.pid() is None and target.listen_addresses():
                owner = listener_pid(*target.listen_addresses()[0])
                if owner is not None:
                    raise InfraError(
                        f"{target.name} on {target.address} is pid {owner or '?'}, not started from "
                        f"{self.config.root}: stop it where it was started"
                    )
            target.daemon.stop(STOP_GRACE_S)

    def status(self) -> ClusterStatus:
        """Health of every expected component, checked over the network."""
        return self._status(self._components())

    def _status(self, components: list[Component]) -> ClusterStatus:
        kafka = [c for c in components if isinstance(c, (KafkaNode, MirrorMakerNode))]
        nodes = [c for c in components if isinstance(c, CassandraNode)]
        with ThreadPoolExecutor(max_workers=1 + len(kafka)) as pool:
            kafka_probes = {c.name: pool.submit(c.probe, PROBE_TIMEOUT_S) for c in kafka}
            cassandra_probe = pool.submit(probe_nodes, nodes, PROBE_TIMEOUT_S) if nodes else None
            results = {name: probe.result() for name, probe in kafka_probes.items()}
            results |= cassandra_probe.result() if cassandra_probe is not None else {}
        return ClusterStatus([self._describe(c, *results[c.name]) for c in components])

    # -- internals ----------------------------------------------------------------------------

    def _components(self) -> list[Component]:
        """Kafka and Cassandra nodes 1..n, where n also covers running nodes beyond ``dcs``
        (started by ``up(dcs=...)`` from another process)."""
        running = [
            int(m.group(1))
            for pid_file in (self.config.root / "run").glob("cassandra-dc*.pid")
            if (m := _CASSANDRA_NAME.match(pid_file.stem))
            and CassandraNode(self.config, int(m.group(1))).daemon.pid() is not None
        ]
        count = max([self.dcs, *running])
        return [*self._kafka_components(), *(CassandraNode(self.config, i) for i in range(1, count + 1))]

    def _kafka_components(self) -> list[Component]:
        """The shared broker; or, when every site has a Kafka cluster of its own, a broker per site
        and the MirrorMaker 2 process between them."""
        if not self.config.kafka_per_site:
            return [KafkaNode(self.config)]
        return [*(KafkaNode(self.config, s.name) for s in self.config.sites), MirrorMakerNode(self.config)]

    def _component(self, name: str) -> Component:
        for component in self._kafka_components():
            if component.name == name:
                return component
        if match := _CASSANDRA_NAME.match(name):
            return CassandraNode(self.config, int(match.group(1)))
        known = [c.name for c in self._kafka_components()]
        raise InfraError(f"unknown component {name!r}: expected {', '.join(map(repr, known))} or 'cassandra-dc<N>'")

    def start_node(self, component: str, timeout: float | None = None) -> ComponentStatus:
        """Start one component (e.g. "mirrormaker" after ``stop_node``) and wait until it is healthy."""
        target = self._component(component)
        timeout = self.config.infra.start_timeout_s if timeout is None else timeout
        with locked(self._lock):
            since = time.time()
            started = self._start([target]) if target.daemon.pid() is None else {}
            self._wait_healthy([target], started, since, time.monotonic() + timeout, timeout, only=[target])
            return self._status([target]).component(target.name)

    def _describe(self, component: Component, healthy: bool, detail: str) -> ComponentStatus:
        """Combine the network verdict with what we know of the process."""
        daemon = component.daemon
        pid = daemon.pid()
        addresses = component.listen_addresses()
        if healthy and pid is None:
            pid = (listener_pid(*addresses[0]) if addresses else None) or None
            detail += f"; not started from {self.config.root}"
        elif not healthy and pid is not None:
            detail = f"process up but {detail}"
        elif not healthy:
            owner = listener_pid(*addresses[0]) if addresses else None
            if owner is not None:
                detail = f"port held by pid {owner or '?'} (not ours); {detail}"
            else:
                detail = "no process; pid file stale" if daemon.stale() else "no process"
        return ComponentStatus(component.name, healthy, detail, pid, component.address)

    def _start(self, components: list[Component]) -> dict[str, subprocess.Popen[bytes]]:
        """Launch the given components, Cassandra first: Kafka formats its storage before
        starting, which overlaps with the slower Cassandra start."""
        if not components:
            return {}
        java = java_binary()
        libs = {c.kind: jars.resolve(self.config.root, c.kind, c.version) for c in components}
        started = {}
        for component in sorted(components, key=lambda c: c.kind != "cassandra"):
            argv, cwd = component.prepare(java, libs[component.kind])
            started[component.name] = component.daemon.start(argv, cwd)
        return started

    def _wait_healthy(
        self,
        pending: list[Component],
        started: dict[str, subprocess.Popen[bytes]],
        since: float,
        deadline: float,
        timeout: float,
        only: list[Component] | None = None,
    ) -> ClusterStatus:
        while True:
            status = self._status(only) if only is not None else self.status()
            if status.healthy:
                return status
            for component in pending:
                if status.component(component.name).healthy:
                    continue
                ended = _ended(component, started.get(component.name))
                if ended is not None:
                    raise InfraError(
                        f"{component.name} failed to start ({ended}); {component.daemon.excerpt(since)}"
                    )
            if time.monotonic() >= deadline:
                unhealthy = [c for c in pending if not status.component(c.name).healthy]
                raise InfraError(
                    f"cluster not healthy after {timeout:.0f} s:\n{status.render()}\n"
                    + "\n".join(c.daemon.excerpt(since) for c in unhealthy)
                )
            time.sleep(POLL_INTERVAL_S)


def _ended(component: Component, proc: subprocess.Popen[bytes] | None) -> str | None:
    """How the process we are waiting for ended, or None while it runs. A process started by this
    call is watched through its Popen (exact, and gives the exit code); one found starting
    through its pid file."""
    if proc is not None:
        code = proc.poll()
        return None if code is None else f"exit code {code}"
    return None if component.daemon.pid() is not None else "process gone"

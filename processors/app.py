"""The grid's stream-processing apps (faust-streaming).

``create_app``: the processors of the grid, one worker per site in one consumer group (with a Kafka
cluster per site: a group per site on its own cluster, reading its own and the mirrored topics), on
``dicom.instance.stored`` (under the grid's ``kafka.topic_prefix``): the **indexer** (events -> Cassandra)
and the **replication fan-out** (events -> ``dicom.replication.requested``, one per target site; not run
in a grid whose sites copy to no other site, where the healing sweep copies what a policy added later
asks for). The workers of every site share the partitions; when a site goes down its partitions move to
the others.

Each message is validated against its topic's schema; one that fails, or whose processing fails for a
reason retrying cannot fix, goes to ``dicom.deadletter`` and the partition moves on. Failures of the
infrastructure (Cassandra or Kafka unreachable) hold the offsets and are retried: nothing is skipped.
Blocking work runs in a thread, never on the event loop.

How soon a partition is processed again when a worker dies is set by the consumer group's session
timeout: until the broker declares the dead member gone, its partitions stay assigned to it, and a
replacement that joins (the supervisor restarts the worker within a second) waits in the rebalance for
the same expiry. faust's default is 60 s; here it is the broker's minimum
(``group.min.session.timeout.ms``, 6 s by default), with heartbeats every second, for every app made by
:func:`faust_app`. A worker stopped with SIGTERM leaves the group at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faust

from dicomgrid import schemas
from dicomgrid.core import metrics
from dicomgrid.core.audit_log import AuditLog, load_signing_key
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.config import GridConfig, KafkaConfig
from dicomgrid.core.index_writer import IndexWriter
from dicomgrid.core.kafka import EventPublisher
from dicomgrid.core.logging import get_logger
from dicomgrid.processors.audit_chain import ChainBuilder
from dicomgrid.processors import fetching
from dicomgrid.processors.dead_letters import DeadLetters, Rejected, decode, is_transient
from dicomgrid.processors.indexer import Indexer
from dicomgrid.processors.replication_policy import replicates, replication_requests

log = get_logger(__name__)

BATCH_SIZE = 500
BATCH_WITHIN_S = 0.2
RETRY_S = 2.0
# Kafka brokers refuse sessions shorter than group.min.session.timeout.ms (default 6000 ms); heartbeats
# must come several times per session. (The rebalance timeout stays faust's 60 s: it bounds how long a
# live member may take to rejoin, while a dead one is dropped at its session timeout.)
SESSION_TIMEOUT_S = 6.0
HEARTBEAT_INTERVAL_S = 1.0


def faust_broker(config: GridConfig) -> list[str]:
    return [f"kafka://{server.strip()}" for server in config.kafka.bootstrap_servers.split(",")]


def kafka_ssl_context(k: KafkaConfig) -> ssl.SSLContext:
    """The TLS context faust's client (aiokafka) reaches the brokers with, as librdkafka's settings say."""
    context = ssl.create_default_context(cafile=str(k.ssl_ca_location) if k.ssl_ca_location else None)
    context.check_hostname = k.ssl_check_hostname
    if k.ssl_certificate_location is not None:
        context.load_cert_chain(k.ssl_certificate_location, k.ssl_key_location, password=k.key_password())
    return context


def _credentials(config: GridConfig) -> Any:
    k = config.kafka
    context = kafka_ssl_context(k) if k.uses_tls else None
    if k.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=k.sasl_username, password=k.password(), mechanism=k.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def consumer_group(config: GridConfig, site: str | None = None) -> str:
    """The consumer group of a grid's processors: one per grid, shared by the workers of all its sites
    on the one shared Kafka cluster; with a cluster per site, one per site (``<grid>-processors-<site>``),
    on that site's cluster."""
    if config.kafka_per_site and site is not None:
        return f"{config.name}-processors-{config.site(site).name}"
    return f"{config.name}-processors"


def faust_app(config: GridConfig, group: str, datadir: Path) -> faust.App:
    """A faust app of the grid: consumer group ``group``, topics declared by `dicomgrid schema apply`."""
    datadir.mkdir(parents=True, exist_ok=True)
    return fetching.App(
        group,
        broker=faust_broker(config),
        broker_credentials=_credentials(config),
        id_format="{id}",
        store="memory://",
        web_enabled=False,
        # No leader topic: the broker does not auto-create topics, and nothing here needs a leader.
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        datadir=str(datadir),
        broker_commit_every=200,
        broker_commit_interval=1.0,
        broker_session_timeout=SESSION_TIMEOUT_S,
        broker_heartbeat_interval=HEARTBEAT_INTERVAL_S,
    )


def raw_topic(app: faust.App, config: GridConfig, logical: str, *, site: str | None = None) -> Any:
    """One of the grid's topics, its messages as raw bytes (each processor validates them itself).

    Given ``site``: every physical topic that site reads for ``logical`` (its own, and with a Kafka
    cluster per site the other sites' as mirrored into its cluster: :meth:`GridConfig.consumed_topics`).
    """
    names = config.consumed_topics(site, logical) if site is not None else [config.kafka.topic(logical)]
    return app.topic(*names, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw")


async def connect_cassandra(config: GridConfig, local_dc: str) -> Cassandra:
    """Connect to Cassandra, waiting for it rather than failing the worker."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            db = Cassandra(config, local_dc=local_dc)
            await loop.run_in_executor(None, lambda: db.session)
            return db
        except Exception as exc:
            log.warning("cassandra unreachable; retrying", error=str(exc))
            await asyncio.sleep(3.0)


async def publish_all(publisher: EventPublisher, topic: str, keyed: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Publish events and wait until the brokers have every one; while they do not, hold and retry."""
    while True:
        try:
            futures = [asyncio.wrap_future(publisher.publish(topic, key, event)) for key, event in keyed]
            await asyncio.gather(*futures)
            return
        except Exception as exc:  # Kafka unavailable; a repeat is harmless (consumers are idempotent)
            log.warning("events not confirmed; retrying", topic=topic, events=len(keyed), error=str(exc))
            await asyncio.sleep(RETRY_S)


class _IndexingAgent:
    """The indexer over faust events: valid ones indexed in batches, the others dead-lettered."""

    def __init__(self, indexer: Indexer, dead: DeadLetters, site: str) -> None:
        self.site = site
        self.indexer = indexer
        self.dead = dead

    async def batch(self, events: Sequence[Any]) -> None:
        good = []
        for event in events:
            try:
                good.append((event, decode(event.message.value, schemas.TOPIC_INSTANCE_STORED)))
            except Rejected as exc:
                await self.dead.send(event.message, str(exc))
        if good and await self._apply([e for _, e in good]) is None:
            self._observe([e for _, e in good])
        elif good:
            # Something in the batch cannot be indexed: one at a time, so only what fails is set aside.
            for event, decoded in good:
                error = await self._apply([decoded])
                if error is not None:
                    await self.dead.send(event.message, error)

    def _observe(self, decoded: list[dict[str, Any]]) -> None:
        metrics.INDEXED.labels(self.site).inc(len(decoded))
        oldest = min(dt.datetime.fromisoformat(e["occurred_at"]) for e in decoded)
        metrics.INDEX_LAG.labels(self.site).set((dt.datetime.now(dt.UTC) - oldest).total_seconds())

    async def _apply(self, decoded: list[dict[str, Any]]) -> str | None:
        """Index ``decoded``; None once done, or why it failed for a reason retrying cannot fix."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self.indexer.apply, decoded)
                return None
            except Exception as exc:
                if not is_transient(exc):
                    return f"indexer: {type(exc).__name__}: {str(exc)[:300]}"
                log.warning("indexing failed; retrying", error=str(exc), instances=len(decoded))
                await asyncio.sleep(RETRY_S)


def create_app(config: GridConfig, site: str) -> faust.App:
    """The processors of site ``site``.

    With one shared Kafka cluster the workers of every site are one consumer group and share the
    partitions. With a cluster per site each site's worker is a group of its own on its own cluster:
    its indexer reads the site's instance events and the other sites' mirrored ones (each datacenter
    indexes every instance, LOCAL_QUORUM, so no site waits on another's processors), while the
    replication fan-out and the audit chain read the site's own events only (each request and each
    chain record is made once, where the event was made).
    """
    config = config.for_site(site)
    site_config = config.site(site)
    group = consumer_group(config, site_config.name)
    app = faust_app(config, group, config.root / "processors" / config.name / site_config.name)
    instance_stored = raw_topic(app, config, schemas.TOPIC_INSTANCE_STORED)
    indexed = raw_topic(app, config, schemas.TOPIC_INSTANCE_STORED, site=site_config.name) \
        if config.kafka_per_site else instance_stored
    publisher = EventPublisher(config.kafka, client_id=f"dicomgrid-processors-{site_config.name}")

    indexers: list[Indexer] = []

    @app.agent(indexed, name="indexer")
    async def index(stream: faust.Stream) -> None:
        db = await connect_cassandra(config, site_config.cassandra_dc)
        indexer = Indexer(IndexWriter(db))
        indexers.append(indexer)
        agent = _IndexingAgent(indexer, DeadLetters(publisher, "indexer"), site_config.name)
        log.info("indexer running", site=site_config.name, group=group)
        async for events in stream.take_events(BATCH_SIZE, within=BATCH_WITHIN_S):
            await agent.batch(events)

    async def fan_out(stream: faust.Stream) -> None:
        async for events in stream.take_events(BATCH_SIZE, within=BATCH_WITHIN_S):
            requests = []
            for event in events:
                try:
                    stored = decode(event.message.value, schemas.TOPIC_INSTANCE_STORED)
                except Rejected:
                    continue  # the indexer dead-letters it
                requests += [(r["source"]["sha256"], r) for r in replication_requests(config, stored)]
            if requests:
                await publish_all(publisher, schemas.TOPIC_REPLICATION_REQUESTED, requests)

    # A grid whose sites copy to no other site has nothing to fan out: every event would be decoded
    # and dropped, at a second pass over the topic.
    if replicates(config):
        app.agent(instance_stored, name="replication-fanout")(fan_out)

    chain: dict[str, ChainBuilder] = {}

    @app.agent(raw_topic(app, config, schemas.TOPIC_AUDIT), name="audit-chain")
    async def audit_chain(stream: faust.Stream) -> None:
        db = await connect_cassandra(config, site_config.cassandra_dc)
        builder = chain.setdefault("builder", ChainBuilder(AuditLog(db), load_signing_key(config.audit_signing_key_file)))
        dead = DeadLetters(publisher, "audit-chain")
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(BATCH_SIZE, within=BATCH_WITHIN_S):
            records = []
            for event in events:
                try:
                    records.append(decode(event.message.value, schemas.TOPIC_AUDIT))
                except Rejected as exc:
                    await dead.send(event.message, str(exc))
            while records:
                try:
                    await loop.run_in_executor(None, builder.apply, records)
                    break
                except Exception as exc:  # Cassandra unavailable: hold the offsets and retry, never skip
                    log.warning("audit records not chained yet; retrying", error=str(exc), records=len(records))
                    await asyncio.sleep(RETRY_S)

    @app.on_partitions_assigned.connect
    async def _reassigned(app: faust.App, assigned: Any, **kwargs: Any) -> None:
        if "builder" in chain:
            chain["builder"].forget()
        # Studies of partitions this worker did not hold may have been indexed by another one.
        for indexer in indexers:
            indexer.forget()

    @app.on_before_shutdown.connect
    async def _flush(app: faust.App, **kwargs: Any) -> None:
        publisher.flush()
        if "builder" in chain:
            try:
                chain["builder"].sign_all()
            except Exception as exc:  # the next builder signs at its first checkpoint
                log.warning("audit chain end not signed at shutdown", error=str(exc))

    return app

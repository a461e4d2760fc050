"""Kafka access shared by every grid process: a durable event publisher and topic administration."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import tenacity
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from dicomgrid import schemas
from dicomgrid.core.config import GridConfig, KafkaConfig
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)


# How the grid's stream consumers fetch: the broker answers a fetch once this much is waiting on its
# partitions, or after this long. With Kafka's default (one byte) a consumer gets a fetch response, and
# wakes, for nearly every event, on the same cores as the receive path, whose acks=all round trip
# they stretch; a throughput-tuned stream application batches instead, for a bounded delay.
FETCH_MIN_BYTES = 64 * 1024
FETCH_MAX_WAIT_MS = 100


class PublishError(RuntimeError):
    """An event was not confirmed by the brokers (not written, or not known to be written)."""


class TopicsNotServing(TimeoutError):
    """Partitions of topics did not answer a request within the time allowed."""


# Errors a request can meet while a partition gets (or changes) its leader, while a broker restarts,
# or while a consumer group's coordinator moves. librdkafka does not flag most of them retriable on
# the results of offset look-ups, so the codes are named here.
RETRIABLE_ERRORS = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._WAIT_COORD,
    }
)


def is_retriable(exc: BaseException) -> bool:
    """Whether a Kafka call failed in a way that the same call, a moment later, can get past."""
    if not isinstance(exc, KafkaException) or not exc.args or not isinstance(exc.args[0], KafkaError):
        return False
    error: KafkaError = exc.args[0]
    return not error.fatal() and (error.retriable() or error.code() in RETRIABLE_ERRORS)


def _log_retry(state: tenacity.RetryCallState) -> None:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    fields: dict[str, Any] = {"call": getattr(state.fn, "__qualname__", str(state.fn)), "attempt": state.attempt_number}
    if isinstance(error, _Unserved):
        where, why = min(error.reasons.items())
        fields |= {"unserved": len(error.reasons), "first": f"{where} ({why})"}
    elif error is not None:
        fields["error"] = str(error)
    log.debug("kafka call failed; retrying", **fields)


def kafka_retry(timeout: float = 30.0) -> tenacity.Retrying:
    """Retries a Kafka call on the errors of :data:`RETRIABLE_ERRORS` with backoff, for up to ``timeout``
    seconds, then re-raises the last error; any other error is raised at once.

    Use: ``kafka_retry(10)(consumer.get_watermark_offsets, partition, timeout=5)``.
    """
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_retriable),
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_exponential(multiplier=0.02, max=1.0),
        before_sleep=_log_retry,
        reraise=True,
    )


class EventPublisher:
    """Publishes JSON events with idempotence and acks=all; one instance per process.

    Callers name topics by their logical name (``schemas.TOPIC_*``); the publisher writes to the grid's
    physical topic (:meth:`KafkaConfig.topic`).

    :meth:`publish` returns a future that resolves only when the delivery report confirms that every
    in-sync replica has the event. A background thread serves delivery reports, so concurrent callers
    (one per DICOM association) share batches without waiting for each other. ``linger.ms`` is 0: a
    waiting sender pays no batching delay (an acks=all round trip here: ~0.25 ms at 0, ~2.5 ms at 2),
    and librdkafka still batches what queues up while a request is in flight.
    """

    def __init__(self, config: KafkaConfig, *, client_id: str = "dicomgrid", linger_ms: int = 0) -> None:
        self._timeout_s = config.delivery_timeout_s
        self._topic = config.topic
        self._producer: Producer | None = Producer(
            {
                **config.client_config(),
                "client.id": client_id,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": linger_ms,
                "compression.type": "lz4",
                # Each C-STORE waits on its own produce request; Nagle would hold a request back
                # behind the previous one's unacknowledged segment.
                "socket.nagle.disable": True,
                # librdkafka retries internally until this expires; then the future fails.
                "delivery.timeout.ms": int(config.delivery_timeout_s * 1000),
                "message.timeout.ms": int(config.delivery_timeout_s * 1000),
                "error_cb": self._on_error,
                # librdkafka's own log lines go through the process's structured logging.
                "logger": logging.getLogger("librdkafka"),
            }
        )
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="kafka-delivery", daemon=True)
        self._poller.start()

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        log.warning("kafka client error", error=str(err), fatal=err.fatal())

    def _poll_loop(self) -> None:
        producer = self._producer
        while producer is not None and not self._closed.is_set():
            producer.poll(0.1)

    def publish(self, topic: str, key: str, event: dict[str, Any]) -> Future[Message]:
        """Queue ``event`` for ``topic`` (a logical name); the future resolves with the delivery report.

        Raises :class:`~dicomgrid.schemas.InvalidEvent` at once, and publishes nothing, if the event
        breaks its topic's schema: consumers rely on every message of a topic matching its contract.
        """
        schemas.validate_event(topic, event)
        # Subscribers route and check versions without parsing the value (docs/events.md).
        headers = [("event_type", str(event.get("event_type", "")).encode()),
                   ("schema_version", str(event.get("schema_version", "")).encode())]
        future: Future[Message] = Future()
        topic = self._topic(topic)
        producer = self._producer
        if producer is None:
            future.set_exception(PublishError(f"{topic}: publisher closed"))
            return future

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                future.set_exception(PublishError(f"{topic}: {err.str()}"))
            else:
                future.set_result(msg)

        value = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            producer.produce(topic, key=key.encode(), value=value, headers=headers, on_delivery=on_delivery)
        except BufferError:
            # Local queue full: poll once to drain reports, then try again before giving up.
            producer.poll(0.5)
            try:
                producer.produce(topic, key=key.encode(), value=value, headers=headers, on_delivery=on_delivery)
            except (BufferError, KafkaException) as exc:
                future.set_exception(PublishError(f"{topic}: local queue full: {exc}"))
        except KafkaException as exc:
            future.set_exception(PublishError(f"{topic}: {exc}"))
        return future

    def publish_and_wait(self, topic: str, key: str, event: dict[str, Any], timeout: float | None = None) -> Message:
        """Publish and block until the brokers confirm; raise :class:`PublishError` otherwise."""
        return self.wait(self.publish(topic, key, event), timeout, self._topic(topic))

    def wait(self, future: Future[Message], timeout: float | None = None, topic: str = "event") -> Message:
        """Block until the brokers confirm a :meth:`publish`; raise :class:`PublishError` otherwise."""
        try:
            return future.result(timeout=(timeout or self._timeout_s) + 1.0)
        except FutureTimeout as exc:
            raise PublishError(f"{topic}: no delivery report within {timeout or self._timeout_s}s") from exc

    def flush(self, timeout: float = 10.0) -> int:
        return self._producer.flush(timeout) if self._producer is not None else 0

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (for up to ``timeout``), fail what is left, release the client.

        The librdkafka handle is destroyed here rather than left to garbage collection: a publisher
        still referenced (by a failed test's traceback, say) would go on reconnecting, and logging,
        to brokers that may be gone long after its owner is done.
        """
        producer = self._producer
        if producer is None:
            return
        producer.flush(timeout)
        self._producer = None
        self._closed.set()
        self._poller.join(timeout=1.0)
        # Undelivered events fail their futures (PublishError) instead of waiting forever.
        producer.purge()
        producer.poll(0)
        producer.close()


def mirrored_topic(alias: str, physical: str) -> str:
    """The name MirrorMaker 2 (DefaultReplicationPolicy) gives topic ``physical`` of the cluster
    ``alias`` in the clusters it is mirrored to."""
    return f"{alias}.{physical}"


def _physical_names(config: KafkaConfig, name: str, mirrored_from: Sequence[str]) -> list[str]:
    own = config.topic(name)
    return [own, *(mirrored_topic(alias, own) for alias in mirrored_from)]


def ensure_topics(config: KafkaConfig, timeout: float = 30.0, mirrored_from: Sequence[str] = ()) -> list[str]:
    """Create every topic of the contract (under the grid's prefix) that does not exist yet; return the
    physical names created.

    ``mirrored_from``: MirrorMaker 2 aliases of the other sites' clusters whose topics are mirrored
    into this one; their topics (``<alias>.<topic>``) are created too, with the same layout, so the
    site's processors subscribe to them from the start instead of waiting for MirrorMaker to make them.

    Returns only once every partition of every topic of the contract answers a request, so a grid
    started right after can use them at once; raises :class:`TopicsNotServing` if some partition
    does not within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    admin = AdminClient(config.client_config())
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = []
    for spec, physical in ((spec, physical) for spec in schemas.topics().values()
                           for physical in _physical_names(config, spec.name, mirrored_from)):
        if physical in existing:
            continue
        topic_config = {
            k: v.replace("{min_insync_replicas}", str(config.min_insync_replicas)) for k, v in spec.config.items()
        }
        wanted.append(
            NewTopic(
                physical,
                num_partitions=spec.partitions or config.partitions,
                replication_factor=spec.replication_factor or config.replication_factor,
                config=topic_config,
            )
        )
    futures = admin.create_topics(wanted, request_timeout=timeout) if wanted else {}
    created = _settled(futures, KafkaError.TOPIC_ALREADY_EXISTS, timeout)
    # Every topic, not only those created here: one made by a concurrent or interrupted call may not
    # serve yet either, and asking costs one request.
    wait_until_serving(admin, [p for name in schemas.topics() for p in _physical_names(config, name, mirrored_from)],
                       max(deadline - time.monotonic(), 1.0))
    return created


def ensure_grid_topics(config: GridConfig, timeout: float = 30.0) -> list[str]:
    """:func:`ensure_topics` on the grid's shared cluster, or on every site's own cluster (with the other
    sites' mirrored topics) when each site has one; the physical names created (``site:topic`` then)."""
    if not config.kafka_per_site:
        return ensure_topics(config.kafka, timeout)
    created = []
    for site in config.sites:
        others = [config.mirror_alias(s.name) for s in config.sites if s.name != site.name]
        created += [f"{site.name}:{t}" for t in ensure_topics(config.site_kafka(site.name), timeout, others)]
    return created


def mirrored_from(config: GridConfig, site: str) -> list[str]:
    """The aliases of the clusters mirrored into site ``site``'s (none with one shared cluster)."""
    if not config.kafka_per_site:
        return []
    return [config.mirror_alias(s.name) for s in config.sites if s.name != site]


def wait_for_topics(config: KafkaConfig, timeout: float = 30.0, mirrored_from: Sequence[str] = ()) -> None:
    """Wait until every partition of the grid's topics answers a request (after a broker restart, say)."""
    admin = AdminClient(config.client_config())
    wait_until_serving(admin, [p for name in schemas.topics() for p in _physical_names(config, name, mirrored_from)],
                       timeout)


class _Unserved(Exception):
    """Partitions that did not answer in one round of :func:`wait_until_serving`, with why."""

    def __init__(self, reasons: dict[str, str]) -> None:
        super().__init__(", ".join(f"{where} ({why})" for where, why in sorted(reasons.items())))
        self.reasons = reasons


def wait_until_serving(admin: AdminClient, topics: Iterable[str], timeout: float = 30.0) -> None:
    """Return once every partition of ``topics`` answers a ListOffsets request (its latest offset).

    Metadata alone does not tell: right after CreateTopics, KRaft metadata names a partition's leader
    while that broker still answers NOT_LEADER_FOR_PARTITION, and consumers that look up offsets then
    fail. Only a request the leader itself serves shows that the partition is usable. Raises
    :class:`TopicsNotServing` naming the partitions that did not answer within ``timeout``.
    """
    topics = list(topics)
    if not topics:
        return
    deadline = time.monotonic() + timeout

    def round_trip() -> None:
        per_request = min(max(deadline - time.monotonic(), 0.1), 5.0)
        metadata = admin.list_topics(timeout=per_request).topics
        unserved: dict[str, str] = {}
        partitions = []
        for topic in topics:
            meta = metadata.get(topic)
            if meta is None:
                unserved[topic] = "not in metadata"
            elif meta.error is not None or not meta.partitions:
                unserved[topic] = meta.error.name() if meta.error is not None else "no partitions"
            else:
                partitions += [TopicPartition(topic, p) for p in meta.partitions]
        if partitions:
            requests = admin.list_offsets({tp: OffsetSpec.latest() for tp in partitions}, request_timeout=per_request)
            for tp, future in requests.items():
                try:
                    future.result(timeout=per_request + 1.0)
                except FutureTimeout:
                    unserved[f"{tp.topic}[{tp.partition}]"] = "no answer"
                except KafkaException as exc:
                    if not is_retriable(exc):
                        raise
                    unserved[f"{tp.topic}[{tp.partition}]"] = exc.args[0].name()
        if unserved:
            raise _Unserved(unserved)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, _Unserved) or is_retriable(exc)),
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_exponential(multiplier=0.01, max=0.5),
        before_sleep=_log_retry,
        reraise=True,
    )
    try:
        retrying(round_trip)
    except _Unserved as exc:
        raise TopicsNotServing(f"partitions not serving after {timeout:.0f}s: {exc}") from None
    except KafkaException as exc:
        if not is_retriable(exc):
            raise
        raise TopicsNotServing(f"topics {', '.join(topics)} not serving after {timeout:.0f}s: {exc}") from exc


def _settled(futures: dict[str, Any], harmless: int, timeout: float) -> list[str]:
    """Wait for an admin operation per topic; the topics it did, ignoring the ``harmless`` error code."""
    done = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            done.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != harmless:
                raise
    return done


def missing_topics(config: KafkaConfig, timeout: float = 10.0, mirrored_from: Sequence[str] = ()) -> list[str]:
    """The grid's topics (physical names) that do not exist; raises KafkaException if Kafka cannot answer."""
    admin = AdminClient(config.client_config())
    existing = set(admin.list_topics(timeout=timeout).topics)
    return [p for name in schemas.topics() for p in _physical_names(config, name, mirrored_from) if p not in existing]


def wait_until_created(config: KafkaConfig, *, interval: float = 2.0, mirrored_from: Sequence[str] = ()) -> None:
    """Block until every topic of the grid exists and serves (however long that takes).

    A stream processor started before ``dicomgrid schema apply`` would otherwise subscribe to nothing
    (faust ignores missing topics) and never process anything while looking healthy.
    """
    reported = 0.0
    while True:
        try:
            missing = missing_topics(config, mirrored_from=mirrored_from)
        except KafkaException as exc:
            missing = [f"(Kafka unreachable: {exc})"]
        if not missing:
            wait_for_topics(config, timeout=60.0, mirrored_from=mirrored_from)
            return
        if time.monotonic() - reported > 30.0:
            log.warning("waiting for the grid's topics; run `dicomgrid schema apply`", missing=missing)
            reported = time.monotonic()
        time.sleep(interval)


def delete_topics(config: KafkaConfig, timeout: float = 30.0) -> list[str]:
    """Delete the topics of a grid with its own ``topic_prefix`` (a test or benchmark grid); return the
    physical names deleted. Refused without a prefix: the unprefixed topics may be any grid's log."""
    if not config.topic_prefix:
        raise ValueError("refusing to delete the unprefixed topics of the contract")
    admin = AdminClient(config.client_config())
    existing = set(admin.list_topics(timeout=timeout).topics)
    names = [config.topic(name) for name in schemas.topics() if config.topic(name) in existing]
    futures = admin.delete_topics(names, request_timeout=timeout) if names else {}
    return _settled(futures, KafkaError.UNKNOWN_TOPIC_OR_PART, timeout)


def last_record_age_s(config: KafkaConfig, topic: str, timeout: float = 5.0) -> float | None:
    """Seconds since the newest record of ``topic`` (any partition) was written, by its timestamp; None
    when the topic does not exist, is empty, or the cluster does not answer within ``timeout``.

    MirrorMaker 2 writes a heartbeat a second into every cluster it mirrors into (``heartbeats``) and
    mirrors those onwards (``<alias>.heartbeats``), so this tells whether a flow is alive.
    """
    consumer = Consumer({**config.client_config(), "group.id": f"dicomgrid-probe-{uuid.uuid4()}",
                         "enable.auto.commit": False, "log_level": 0,
                         "socket.connection.setup.timeout.ms": max(int(timeout * 1000), 1000)})
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return None
        newest: float | None = None
        for partition in meta.partitions:
            tp = TopicPartition(topic, partition)
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, high - 1)])
            msg = consumer.poll(timeout)
            if msg is not None and msg.error() is None:
                kind, stamp = msg.timestamp()
                if kind != TIMESTAMP_NOT_AVAILABLE:
                    newest = max(newest or 0.0, stamp / 1000.0)
        return None if newest is None else max(time.time() - newest, 0.0)
    except KafkaException:
        return None
    finally:
        consumer.close()

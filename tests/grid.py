"""A grid under test: its own sites, ports, keyspace and consumer group, on the shared local cluster.

The test grid never touches a development grid started with ``make run``: it has its own Kafka topics
(``kafka.topic_prefix`` derived from its name), so it sees only the events it produces itself.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cassandra import DriverException
from cassandra.cluster import NoHostAvailable
from confluent_kafka import Consumer, ConsumerGroupState, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from dicomgrid import schemas
from dicomgrid.core.config import DEFAULTS_FILE, GridConfig, load_config
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.tokens import issue
from dicomgrid.core.kafka import kafka_retry
from dicomgrid.processors.app import consumer_group

TEST_GRID_PREFIX = "dicomgrid-test-"
# How long an offset or metadata look-up keeps retrying while a partition or coordinator is not
# serving (a topic just created, a broker just restarted).
KAFKA_LOOKUP_TIMEOUT_S = 30.0

# Storage Commitment requestors of the tests (tests/integration/test_storage_commitment.py): one that
# listens for its reports, and one listed at an address where nothing listens.
COMMIT_SCU, UNREACHABLE_SCU = "COMMITSCU", "DEADSCU"
# The identity (certificate CN) of a modality's TLS client certificate mapped to the STORESCU AE title.
MAPPED_CERT_IDENTITY = "modality-1.example.test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_keyspace(name: str) -> str:
    """The keyspace of the test grid named ``name`` (``dicomgrid-test-<pid>`` -> ``dicomgrid_test_<pid>``)."""
    return name.replace("-", "_")


def write_test_config(path: Path, name: str, data_dir: Path, storage: Path) -> Path:
    """A two-site grid config for tests on free ports, sharing the cluster under ``data_dir``, with its
    own topics (prefix ``<name>.``) and its own keyspace: what the index lists is what this session's
    blob stores hold, which the healing jobs rely on."""
    sites = []
    for site, dc, peer in (("A", "dc1", "B"), ("B", "dc2", "A")):
        dicom_port, dicom_tls_port, http_port = free_port(), free_port(), free_port()
        sites.append(
            f'[[sites]]\nname = "{site}"\nae_title = "GRID_{site}"\ndicom_port = {dicom_port}\n'
            f'dicom_tls_port = {dicom_tls_port}\n'
            f'http_port = {http_port}\nstorage_root = "{storage / site}"\ncassandra_dc = "{dc}"\n'
            f'replicate_to = ["{peer}"]\n'
        )
    with DEFAULTS_FILE.open("rb") as fh:
        allowed = tomllib.load(fh)["security"]["allowed_calling_aes"] + [COMMIT_SCU, UNREACHABLE_SCU]
    path.write_text(
        f'name = "{name}"\ndata_dir = "{data_dir}"\nlog_level = "INFO"\n'
        f'[cassandra]\nkeyspace = "{test_keyspace(name)}"\n'
        f'[kafka]\ndelivery_timeout_s = 6.0\ntopic_prefix = "{name}."\n'
        f'[security]\nallowed_calling_aes = {json.dumps(allowed)}\n'
        # The session's own development CA, certificates and token keys (made by the grid fixture).
        f'secrets_dir = "{storage.parent / "secrets"}"\n'
        # DICOM TLS as shipped (plain port beside it, for DCMTK and Orthanc); DICOMweb and the payload
        # endpoint over plain HTTP, with bearer tokens required as shipped (see bearer()). HTTPS itself
        # is tested on the payload endpoint (tests/unit/peer_sites.py) and in test_security.py.
        '[tls]\nhttp = false\n'
        # A client certificate whose CN is not an AE title, speaking for one (tests/integration/test_security.py).
        f'[tls.ae_identities]\n"{MAPPED_CERT_IDENTITY}" = ["STORESCU"]\n'
        # Orthanc's DICOM port is free rather than the shipped 4242, so parallel sessions do not collide;
        # the interop fixtures start Orthanc where this says.
        f'[remote_aes]\nORTHANC = {{ host = "127.0.0.1", port = {free_port()} }}\n'
        'STORESCP = { host = "127.0.0.1", port = 11119 }\n'
        f'{COMMIT_SCU} = {{ host = "127.0.0.1", port = {free_port()} }}\n'
        f'{UNREACHABLE_SCU} = {{ host = "127.0.0.1", port = {free_port()} }}\n'
        # Short enough for the timeout, delivery-failure and restart tests; long enough for replication.
        '[storage_commitment]\ntimeout_s = 10.0\nunknown_grace_s = 1.5\npoll_interval_s = 0.2\n'
        'report_attempts = 3\nreport_backoff_initial_s = 0.2\nreport_backoff_max_s = 0.5\nreport_timeout_s = 3.0\n'
        'lease_s = 3.0\nscan_interval_s = 0.5\n'
        # The Parquet sink writes small files often, so tests see their rows in a second.
        '[analytics]\nflush_rows = 50\nflush_s = 1.0\n'
        + "\n".join(sites)
    )
    return path


def partitions_of(client: Consumer | AdminClient, topic: str, timeout: float = KAFKA_LOOKUP_TIMEOUT_S) -> list[TopicPartition]:
    """The partitions of ``topic``, waiting while the metadata does not know it yet."""

    def lookup() -> list[TopicPartition]:
        meta = client.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise KafkaException(meta.error if meta is not None else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        return [TopicPartition(topic, p) for p in sorted(meta.partitions)]

    return kafka_retry(timeout)(lookup)


def watermarks(consumer: Consumer, partition: TopicPartition, timeout: float = KAFKA_LOOKUP_TIMEOUT_S) -> tuple[int, int]:
    """(low, high) offsets of a partition, waiting while its leader is not serving."""
    return kafka_retry(timeout)(consumer.get_watermark_offsets, partition, timeout=10)


def end_offsets(admin: AdminClient, partitions: list[TopicPartition], timeout: float = KAFKA_LOOKUP_TIMEOUT_S) -> dict[int, int]:
    """The latest offset of each partition (of one topic), by partition, in one request; waiting while a
    leader is not serving."""

    def lookup() -> dict[int, int]:
        requests = admin.list_offsets({tp: OffsetSpec.latest() for tp in partitions}, request_timeout=10)
        return {tp.partition: future.result().offset for tp, future in requests.items()}

    return kafka_retry(timeout)(lookup)


@dataclass
class EventTap:
    """Reads a topic (logical name, e.g. ``schemas.TOPIC_AUDIT``) of the grid from the offsets it had when
    the tap was made. Open taps through the ``taps`` fixture, which closes them after the test."""

    config: GridConfig
    topic: str
    _consumer: Consumer = field(init=False)
    # Offsets are looked up on a connection of their own: the consumer's connection to the leader is
    # mostly busy with a fetch waiting for data, and a look-up queued behind it waits as long.
    _admin: AdminClient | None = field(init=False, default=None)
    _partitions: list[TopicPartition] = field(init=False, default_factory=list)
    _next: dict[int, int] = field(init=False, default_factory=dict)  # partition -> next offset to read
    _closed: bool = field(init=False, default=False)
    seen: list[dict[str, Any]] = field(default_factory=list)
    from_start: bool = False  # read the topic from its beginning rather than from its current end

    def __post_init__(self) -> None:
        self._consumer = Consumer(
            {
                **self.config.kafka.client_config(),
                "group.id": f"test-tap-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._admin = AdminClient(self.config.kafka.client_config())
        try:
            topic = self.config.kafka.topic(self.topic)
            self._partitions = partitions_of(self._admin, topic)
            self._next = end_offsets(self._admin, self._partitions)
            if self.from_start:
                self._next = {p: 0 for p in self._next}
            self._consumer.assign([TopicPartition(topic, p, offset) for p, offset in self._next.items()])
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        for msg in self._consumer.consume(500, timeout=0.5):
            if msg.error() is None:
                self.seen.append(json.loads(msg.value()))
                self._next[msg.partition()] = msg.offset() + 1

    def collect(self, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until ``until(seen)`` holds (or the timeout passes); returns everything seen."""
        deadline = time.monotonic() + timeout
        while not until(self.seen) and time.monotonic() < deadline:
            self._read()
        return self.seen

    def catch_up(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Read everything the topic holds at this moment; returns everything seen.

        An event published (and acknowledged) before the call is in what this returns: after a
        C-STORE response, say, since the grid publishes an instance's event before it answers.
        """
        assert self._admin is not None, "tap closed"
        ends = end_offsets(self._admin, self._partitions)
        deadline = time.monotonic() + timeout
        while behind := {p: (self._next[p], end) for p, end in ends.items() if self._next[p] < end}:
            assert time.monotonic() < deadline, f"{self.topic}: not read to the end within {timeout}s: {behind}"
            self._read()
        return self.seen

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()
            self._admin = None


def committed_lag(config: GridConfig, topic: str = schemas.TOPIC_INSTANCE_STORED, group: str | None = None) -> int:
    """Events of one of the grid's topics a consumer group (default: its processors) has not committed yet.

    Only reads the group's committed offsets (no subscription), so it never joins the group.
    """
    physical = config.kafka.topic(topic)
    consumer = Consumer(
        {**config.kafka.client_config(), "group.id": group or consumer_group(config), "enable.auto.commit": False}
    )
    try:
        partitions = partitions_of(consumer, physical)
        lag = 0
        for committed in kafka_retry(KAFKA_LOOKUP_TIMEOUT_S)(consumer.committed, partitions, timeout=10):
            low, high = watermarks(consumer, committed)
            lag += high - (committed.offset if committed.offset >= 0 else low)
        return lag
    finally:
        consumer.close()


def processors_assignment(config: GridConfig) -> dict[str, set[int]] | None:
    """Partitions by topic assigned to the grid's processors once their group is stable with a member
    per site; None before."""
    admin = AdminClient(config.kafka.client_config())
    group = consumer_group(config)
    description = kafka_retry(KAFKA_LOOKUP_TIMEOUT_S)(
        lambda: admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    )
    if description.state != ConsumerGroupState.STABLE or len(description.members) < len(config.sites):
        return None
    assigned: dict[str, set[int]] = {}
    for member in description.members:
        for tp in member.assignment.topic_partitions if member.assignment else []:
            assigned.setdefault(tp.topic, set()).add(tp.partition)
    return assigned


def processors_joined(config: GridConfig) -> bool:
    """Whether every site's processors are in the grid's consumer group and every partition of the
    grid's instance events is assigned: until then an event can wait on the group's (re)balance."""
    assigned = processors_assignment(config)
    if assigned is None:
        return False
    topic = config.kafka.topic(schemas.TOPIC_INSTANCE_STORED)
    admin = AdminClient(config.kafka.client_config())
    return assigned.get(topic, set()) == {tp.partition for tp in partitions_of(admin, topic)}


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.3) -> Any:
    """Retry ``check`` until it returns a truthy value; return it or fail with the last one."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout}s"
            return value
        time.sleep(interval)


def index_reader(config: GridConfig, dc: str) -> IndexReader:
    """The index as a site in datacenter ``dc`` reads it; close it with ``reader.db.close()``."""
    return IndexReader(Cassandra(config, local_dc=dc))


def dc_serves(config: GridConfig, dc: str) -> bool:
    """Whether datacenter ``dc`` serves a read of the grid's index at LOCAL_QUORUM, through a new session
    pinned to it: a node that has just (re)started can answer its port before it serves a keyspace."""
    store = index_reader(config, dc)
    try:
        store.study("0.0")
        return True
    except (DriverException, NoHostAvailable, OSError):
        return False
    finally:
        store.db.close()


def load_test_config(path: Path) -> GridConfig:
    return load_config(path)


_TOKENS: dict[tuple[str, tuple[str, ...]], str] = {}


def bearer(config: GridConfig, *scopes: str) -> dict[str, str]:
    """The Authorization header of a token of the test grid, with ``scopes`` (default: read and write),
    as a DICOMweb client of the grid sends it (``dicomgrid token issue``)."""
    key = (config.name, scopes or ("read", "write"))
    if key not in _TOKENS:
        _TOKENS[key] = issue(config, list(key[1]), subject="test-suite", ttl_s=6 * 3600)
    return {"Authorization": f"Bearer {_TOKENS[key]}"}


class GridWeb:
    """httpx's request functions, sending a token of the session's test grid (read and write scopes)
    as every DICOMweb client of the grid must; the ``grid`` fixture sets ``config``."""

    config: GridConfig | None = None

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        assert self.config is not None, "the grid fixture is not set up"
        return httpx.request(method, url, headers={**bearer(self.config), **(headers or {})}, **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


web = GridWeb()


class _Checkpoint:
    """pynetdicom's reactor checkpoint (an Event's set/clear/wait), telling when the reactor is blocked
    in it (see settle_reactor)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._flag = True
        self.blocked = threading.Event()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        # Checked and blocked under the lock clear() takes: a reactor that saw the flag set before a
        # clear() is not blocked, one that saw it cleared says so before it waits.
        with self._cond:
            try:
                if not self._flag:
                    self.blocked.set()
                    self._cond.wait_for(lambda: self._flag, timeout)
                return self._flag
            finally:
                self.blocked.clear()


def settle_reactor(assoc: Any, timeout_s: float = 5.0) -> None:
    """Stop a requestor association's reactor for good before its next DIMSE request.

    pynetdicom pauses the reactor at each ``send_*`` by clearing a checkpoint and waiting for the
    reactor's ``_is_paused``, which the reactor sets *before* it waits on that checkpoint. Right after
    the previous operation ended (the checkpoint set again), the flag can therefore read true while the
    reactor is in fact running on: it then takes the next operation's first response off the queue as an
    unexpected request, logs "Received unexpected C-FIND service message" and drops it (the symptom of
    pynetdicom issue #875; an SCP on localhost can answer within that window). No delay closes that
    window on a loaded machine (a thread can wait longer than any of them for the GIL), so the
    association's checkpoint is replaced by one that says when the reactor is blocked in it: cleared
    here, the reactor is paused for good once it has entered it.
    """
    checkpoint = assoc._reactor_checkpoint
    if not isinstance(checkpoint, _Checkpoint):
        # The reactor reads the attribute on each turn; a turn waiting on the old one is let go.
        assoc._reactor_checkpoint = _Checkpoint()
        checkpoint.set()
        checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + timeout_s
    while not checkpoint.blocked.wait(0.05):
        if not assoc.is_alive():
            return  # no reactor to pause: the request fails on its own
        if time.monotonic() > deadline:
            raise TimeoutError("the association's reactor did not pause")


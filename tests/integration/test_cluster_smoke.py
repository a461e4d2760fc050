"""The real local cluster carries data: Kafka with idempotent producers, Cassandra in and across DCs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import DCAwareRoundRobinPolicy
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from dicomgrid.core.config import GridConfig
from dicomgrid.core.kafka import wait_until_serving

pytestmark = pytest.mark.cluster


# -- Kafka ----------------------------------------------------------------------------------------


@pytest.fixture
def topic(cluster: GridConfig) -> Iterator[str]:
    """A fresh topic (the broker does not auto-create topics), deleted afterwards."""
    admin = AdminClient(cluster.kafka.client_config())
    name = f"smoke-{uuid.uuid4().hex[:12]}"
    admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)])[name].result(30)
    wait_until_serving(admin, [name])
    yield name
    admin.delete_topics([name])[name].result(30)


def test_kafka_idempotent_produce_and_group_consume(cluster: GridConfig, topic: str, kafka_clients):
    conf = cluster.kafka.client_config()
    producer = kafka_clients(Producer({**conf, "acks": "all", "enable.idempotence": True}))
    errors = []
    sent = {f"key-{i}": f"value-{i}" for i in range(20)}
    for key, value in sent.items():
        producer.produce(topic, key=key, value=value, on_delivery=lambda err, _msg: errors.append(err))
    assert producer.flush(30) == 0
    assert errors == [None] * len(sent)

    consumer = kafka_clients(
        Consumer({**conf, "group.id": topic, "auto.offset.reset": "earliest", "enable.auto.commit": False})
    )
    consumer.subscribe([topic])
    received = {}
    deadline = time.monotonic() + 30
    while len(received) < len(sent) and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None and msg.error() is None:
            received[msg.key().decode()] = msg.value().decode()
    committed = consumer.commit(asynchronous=False)
    consumer.close()
    assert received == sent
    assert sum(tp.offset for tp in committed) == len(sent)


# -- Cassandra ------------------------------------------------------------------------------------

SessionFactory = Callable[[str], Session]


def _dcs(cluster: GridConfig) -> list[str]:
    return [f"dc{i}" for i in range(1, cluster.infra.cassandra_dcs + 1)]


@pytest.fixture(scope="module")
def dc_session(cluster: GridConfig) -> Iterator[SessionFactory]:
    """Sessions pinned to one datacenter, as each site's services use them (one per DC)."""
    clusters: list[Cluster] = []
    sessions: dict[str, Session] = {}

    def connect(dc: str) -> Session:
        if dc in sessions:
            return sessions[dc]
        profile = ExecutionProfile(
            load_balancing_policy=DCAwareRoundRobinPolicy(local_dc=dc),
            consistency_level=ConsistencyLevel.LOCAL_QUORUM,
            request_timeout=cluster.cassandra.request_timeout_s,
        )
        driver = Cluster(
            cluster.cassandra.contact_points,
            port=cluster.cassandra.port,
            protocol_version=5,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        )
        clusters.append(driver)
        sessions[dc] = driver.connect()
        return sessions[dc]

    yield connect
    for driver in clusters:
        driver.shutdown()


@pytest.fixture(scope="module")
def keyspace(cluster: GridConfig, dc_session: SessionFactory) -> Iterator[str]:
    """A test keyspace replicated once to every datacenter, dropped after the module's tests
    (which use keys of their own: schema changes take seconds, writes milliseconds)."""
    name = f"smoke_{uuid.uuid4().hex[:12]}"
    replication = ", ".join(f"'{dc}': 1" for dc in _dcs(cluster))
    session = dc_session("dc1")
    session.execute(
        f"CREATE KEYSPACE {name} WITH replication = {{'class': 'NetworkTopologyStrategy', {replication}}}"
    )
    session.execute(f"CREATE TABLE {name}.kv (k text PRIMARY KEY, v text)")
    yield name
    session.execute(f"DROP KEYSPACE {name}")


def test_cassandra_local_quorum_in_each_dc(cluster: GridConfig, dc_session: SessionFactory, keyspace: str):
    for dc in _dcs(cluster):
        session = dc_session(dc)
        session.execute(f"INSERT INTO {keyspace}.kv (k, v) VALUES (%s, %s)", (f"local-{dc}", dc))
        row = session.execute(f"SELECT v FROM {keyspace}.kv WHERE k = %s", (f"local-{dc}",)).one()
        assert row is not None and row.v == dc


@pytest.mark.parametrize(
    "write_cl", [ConsistencyLevel.EACH_QUORUM, ConsistencyLevel.LOCAL_QUORUM], ids=["each-q", "local-q"]
)
@pytest.mark.parametrize(
    "read_cl", [ConsistencyLevel.LOCAL_ONE, ConsistencyLevel.LOCAL_QUORUM], ids=["local-one", "local-q"]
)
def test_cassandra_write_in_dc1_is_read_in_dc2(
    cluster: GridConfig, dc_session: SessionFactory, keyspace: str, write_cl: int, read_cl: int
):
    if cluster.infra.cassandra_dcs < 2:
        pytest.skip("needs two datacenters")
    key = f"cross-{uuid.uuid4().hex[:8]}"
    write = dc_session("dc1").prepare(f"INSERT INTO {keyspace}.kv (k, v) VALUES (?, ?)")
    write.consistency_level = write_cl
    dc_session("dc1").execute(write, (key, "from-dc1"))

    read = dc_session("dc2").prepare(f"SELECT v FROM {keyspace}.kv WHERE k = ?")
    read.consistency_level = read_cl
    # EACH_QUORUM has already reached dc2; LOCAL_QUORUM replicates to dc2 asynchronously.
    deadline = time.monotonic() + (0 if write_cl == ConsistencyLevel.EACH_QUORUM else 10)
    while (row := dc_session("dc2").execute(read, (key,)).one()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert row is not None and row.v == "from-dc1"

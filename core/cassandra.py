"""The connection to the metadata store: one Cassandra session per process, preferring the site's DC.

Everything that reads or writes Cassandra goes through :class:`Cassandra`: the index reads of the
consumers (:mod:`dicomgrid.core.index_reader`), the indexer's writes (:mod:`dicomgrid.core.index_writer`)
and the replica ledger (:mod:`dicomgrid.core.ledger`) share one instance, so a process holds one pool of
connections whatever it does.
"""

from __future__ import annotations

import functools
import re
import ssl
import threading
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, ResponseFuture, Session
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement, named_tuple_factory

from dicomgrid import schemas
from dicomgrid.core.config import CassandraConfig, GridConfig

Write = tuple[PreparedStatement, tuple[Any, ...]]
ReplicasOf = Callable[[Write], frozenset[Any]]
# A table named after FROM / INTO / UPDATE without a keyspace in front of it.
_TABLE = re.compile(r"\b(FROM|INTO|UPDATE)\s+([A-Za-z_][A-Za-z0-9_]*)\b(?!\.)", re.IGNORECASE)


@functools.lru_cache(maxsize=512)
def _row_class(colnames: tuple[str, ...]) -> Callable[[list[Any]], Any]:
    """The driver's namedtuple row type for these columns, built once (by its own factory)."""
    return type(named_tuple_factory(colnames, [[None] * len(colnames)])[0])._make


def cached_named_tuple_factory(colnames: list[str], rows: list[Any]) -> list[Any]:
    """Rows as the driver's named tuples, without defining a new namedtuple class per result.

    The driver's default factory calls ``namedtuple()`` for every result set; on the ingest path that
    class creation cost more CPU than the query itself.
    """
    make = _row_class(tuple(colnames))
    return [make(row) for row in rows]


def security_options(cass: CassandraConfig) -> dict[str, Any]:
    """The driver's ``auth_provider`` (PasswordAuthenticator) and ``ssl_context`` (client encryption) as
    the config says; the password is read only here, from the config or its file."""
    options: dict[str, Any] = {}
    if cass.username:
        options["auth_provider"] = PlainTextAuthProvider(cass.username, cass.secret_password() or "")
    if cass.ssl:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cass.ssl_ca_file) if cass.ssl_ca_file else None)
        context.check_hostname = cass.ssl_check_hostname
        if cass.ssl_cert_file is not None:
            context.load_cert_chain(cass.ssl_cert_file, cass.ssl_key_file)
        options["ssl_context"] = context
    return options


def connect(config: GridConfig, local_dc: str | None = None, *, keyspace: bool = True) -> tuple[Cluster, Session]:
    """A driver session that prefers ``local_dc`` and reads/writes at LOCAL_QUORUM."""
    cass = config.cassandra
    local_dc = local_dc or next(iter(cass.replication))
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(
            DCAwareRoundRobinPolicy(local_dc=local_dc, used_hosts_per_remote_dc=cass.remote_dc_failover_hosts)
        ),
        consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        request_timeout=cass.request_timeout_s,
        row_factory=cached_named_tuple_factory,
    )
    cluster = Cluster(
        contact_points=cass.contact_points,
        port=cass.port,
        **security_options(cass),
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=cass.connect_timeout_s,
        protocol_version=5,
    )
    try:
        session = cluster.connect(cass.keyspace if keyspace else None)
    except Exception:
        cluster.shutdown()  # its connection threads would outlive a failed attempt
        raise
    return cluster, session


def apply_schema(config: GridConfig) -> int:
    """Create the keyspace, tables and indexes that do not exist yet; returns statements run."""
    cluster, session = connect(config, keyspace=False)
    try:
        statements = schemas.cql_statements(config.cassandra.keyspace, config.cassandra.replication)
        for statement in statements:
            session.execute(statement, timeout=60)
        return len(statements)
    finally:
        cluster.shutdown()


def missing_tables(config: GridConfig) -> list[str]:
    """The schema's tables that do not exist in the grid's keyspace (all of them if it does not exist)."""
    keyspace = config.cassandra.keyspace
    wanted = [m.group(1) for s in schemas.cql_statements(keyspace, config.cassandra.replication)
              if (m := re.match(rf"CREATE TABLE IF NOT EXISTS {keyspace}\.(\w+)", s))]
    cluster, session = connect(config, keyspace=False)
    try:
        rows = session.execute("SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,))
        existing = {row.table_name for row in rows}
    finally:
        cluster.shutdown()
    return [f"{keyspace}.{table}" for table in wanted if table not in existing]


class Cassandra:
    """A lazily made session on the grid's keyspace, with statements prepared once.

    The connection is made on first use and retried on the next use if Cassandra is unreachable, so a
    site's services start (and ingest keeps working) while the metadata store is down.
    """

    def __init__(self, config: GridConfig, local_dc: str | None = None) -> None:
        self.config = config
        self.local_dc = local_dc
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._lock = threading.Lock()
        self._prepared: dict[str, PreparedStatement] = {}

    @property
    def session(self) -> Session:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    # No ``USE``: statements name their keyspace (see :meth:`prepare`).
                    self._cluster, self._session = connect(self.config, self.local_dc, keyspace=False)
        return self._session

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()

    def prepare(self, cql: str) -> PreparedStatement:
        """Prepare ``cql`` once; its unqualified table names are taken to be the grid keyspace's.

        The table names are qualified in the text: Cassandra 5 warns about every prepared statement
        with unqualified names once a keyspace is in use, and the driver sets one on its connections.
        """
        stmt = self._prepared.get(cql)
        if stmt is None:
            qualified = _TABLE.sub(rf"\1 {self.config.cassandra.keyspace}.\2", cql)
            stmt = self._prepared[cql] = self.session.prepare(qualified)
        return stmt

    def replicas(self, write: Write) -> frozenset[Any]:
        """The hosts holding the partition a write updates (empty when the driver cannot tell)."""
        stmt, params = write
        key = stmt.bind(params).routing_key
        if key is None:
            return frozenset()
        return frozenset(self.session.cluster.metadata.get_replicas(self.config.cassandra.keyspace, key))

    def write(self, cql: str, params: tuple[Any, ...]) -> Write:
        """A prepared statement and its parameters, for a batch or a concurrent execution."""
        return self.prepare(cql), params

    def execute(self, cql: str, params: Iterable[Any] = (), **kwargs: Any) -> Any:
        """Run a prepared statement (prepared once per connection)."""
        return self.session.execute(self.prepare(cql), tuple(params), **kwargs)

    def execute_async(self, cql: str, params: Iterable[Any] = (), **kwargs: Any) -> ResponseFuture:
        return self.session.execute_async(self.prepare(cql), tuple(params), **kwargs)

    def paged(self, cql: str, param_sets: Iterable[tuple[Any, ...]], fetch_size: int) -> Iterable[Any]:
        """Rows of one statement for each parameter set, in order.

        The first page of every parameter set is requested at once (the 32 buckets of a listing are
        read in parallel); later pages are fetched as the caller iterates.
        """
        stmt = self.prepare(cql)
        futures = []
        for params in param_sets:
            bound = stmt.bind(params)
            bound.fetch_size = fetch_size
            futures.append(self.session.execute_async(bound))
        for future in futures:
            yield from future.result()


# Partitions of one request at most: below Cassandra's unlogged_batch_across_partitions_warn_threshold
# (10), and with small groups a few KiB, below its batch_size_warn_threshold (5 KiB).
MAX_PARTITIONS_PER_REQUEST = 8
# Statements per partition of a group that may share a request with others.
SMALL_GROUP = 2


def unlogged(writes: Iterable[Write]) -> BatchStatement:
    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    for stmt, params in writes:
        batch.add(stmt, params)
    return batch


class PartitionWrites:
    """Writes grouped by the partition they update, sent as one request per partition.

    Cassandra applies one mutation per keyspace and partition key, whatever the tables: ``instances``,
    ``series`` and ``studies`` are all keyed by the Study Instance UID, ``instance_versions`` and
    ``instance_locations`` by the SOP Instance UID. So the group key is the partition key's value, and
    an unlogged batch of one group is one mutation on each replica (one commit log entry, one memtable
    update, atomic for that partition) where separate statements cost one each. Single-partition
    batches are exempt from Cassandra's batch size warning and limit (CASSANDRA-10876).

    A group added ``beside`` another travels in the same request when the same replicas hold both
    (``replicas_of``): their coordinator then forwards nothing, and one request costs Cassandra less
    than two. Small groups (at most :data:`SMALL_GROUP` statements a partition, such as one instance's
    version, location and replica rows) whose partitions the same replicas hold are sent together, up to
    :data:`MAX_PARTITIONS_PER_REQUEST` partitions a request: each request costs the driver and the
    coordinator about as much as the rows it carries, and a small cluster (one node per datacenter,
    as every local grid) holds every partition on the same replicas. Any other multi-partition batch
    would make its coordinator split it and forward the parts, so there is none.
    """

    def __init__(self) -> None:
        self._groups: dict[Hashable, list[Write]] = {}
        self._beside: dict[Hashable, Hashable] = {}

    def add(self, partition_key: Hashable, *writes: Write, beside: Hashable | None = None) -> None:
        self._groups.setdefault(partition_key, []).extend(writes)
        if beside is not None:
            self._beside.setdefault(partition_key, beside)

    def __len__(self) -> int:
        return len(self._groups)

    def statements(self, replicas_of: ReplicasOf | None = None,
                   batch: Callable[[list[Write]], Any] = unlogged) -> list[tuple[Any, Any]]:
        requests: list[list[Write]] = []
        # Small requests by the replicas of their partitions: (statements, partitions) being filled.
        filling: dict[frozenset[Any], tuple[list[Write], int]] = {}
        joined: set[Hashable] = set()
        for key, group in self._groups.items():
            if key in joined:
                continue
            joined.add(key)
            if replicas_of is None:
                requests.append(group)
                continue
            replicas = replicas_of(group[0])
            partitions = 1
            other = self._beside.get(key)
            if (replicas and other is not None and other in self._groups and other not in joined and other != key
                    and replicas_of(self._groups[other][0]) == replicas):
                joined.add(other)
                group = group + self._groups[other]
                partitions = 2
            if not replicas or len(group) > SMALL_GROUP * partitions:
                requests.append(group)
                continue
            held, count = filling.get(replicas, ([], 0))
            if count + partitions > MAX_PARTITIONS_PER_REQUEST:
                requests.append(held)
                held, count = [], 0
            filling[replicas] = (held + group, count + partitions)
        requests.extend(held for held, _ in filling.values())
        return [group[0] if len(group) == 1 else (batch(group), None) for group in requests]

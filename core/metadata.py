"""The metadata store: the DICOM index in Cassandra, one datacenter per site.

Every write is an idempotent upsert. Instance-level rows are written ``USING TIMESTAMP`` of the time
the payload was received, so the newest version of an instance wins whatever order events are
replayed in; study and series aggregates are recomputed from the rows, never incremented.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.concurrent import execute_concurrent
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement, named_tuple_factory

from dicomgrid import schemas
from dicomgrid.core.config import GridConfig
from dicomgrid.core.events import StoredVersion
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

STUDY_BUCKETS = 32
# instances rows per unlogged batch: a few KB, under Cassandra's batch size warning (5 KiB).
INSTANCE_ROWS_PER_BATCH = 6


def study_bucket(study_uid: str) -> int:
    """A stable bucket for listing studies page by page without scanning the table."""
    return zlib.crc32(study_uid.encode()) % STUDY_BUCKETS


def parse_da(value: str | None) -> dt.date | None:
    """A DICOM DA value (YYYYMMDD) as a date, or None when absent or malformed."""
    if not value or len(value) != 8 or not value.isdigit():
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def _ts(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _micros(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


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


def _unlogged(writes: list[tuple[PreparedStatement, tuple[Any, ...]]]) -> BatchStatement:
    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    for stmt, params in writes:
        batch.add(stmt, params)
    return batch


def connect(config: GridConfig, local_dc: str | None = None, *, keyspace: bool = True) -> tuple[Cluster, Session]:
    """A driver session that prefers ``local_dc`` and reads/writes at LOCAL_QUORUM."""
    cass = config.cassandra
    local_dc = local_dc or next(iter(cass.replication))
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=local_dc)),
        consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        request_timeout=cass.request_timeout_s,
        row_factory=cached_named_tuple_factory,
    )
    auth = PlainTextAuthProvider(cass.username, cass.password) if cass.username else None
    cluster = Cluster(
        contact_points=cass.contact_points,
        port=cass.port,
        auth_provider=auth,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=cass.connect_timeout_s,
        protocol_version=5,
    )
    session = cluster.connect(cass.keyspace if keyspace else None)
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


class MetadataStore:
    """Index reads and writes for one site's processes.

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
                    # No ``USE``: statements are prepared with the keyspace named, which Cassandra 5
                    # asks for (it warns about USE with prepared statements).
                    self._cluster, self._session = connect(self.config, self.local_dc, keyspace=False)
        return self._session

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()

    def _stmt(self, cql: str) -> PreparedStatement:
        stmt = self._prepared.get(cql)
        if stmt is None:
            stmt = self._prepared[cql] = self.session.prepare(cql, keyspace=self.config.cassandra.keyspace)
        return stmt

    def _write(self, cql: str, params: tuple[Any, ...]) -> tuple[PreparedStatement, tuple[Any, ...]]:
        return self._stmt(cql), params

    def execute(self, cql: str, params: Iterable[Any] = (), **kwargs: Any) -> Any:
        """Run a prepared statement (prepared once per store)."""
        return self.session.execute(self._stmt(cql), tuple(params), **kwargs)

    # -- ingest ----------------------------------------------------------------------------------

    def current_version(self, sop_instance_uid: str) -> Callable[[], StoredVersion | None]:
        """Start looking up the indexed payload of a SOP Instance UID; call the result to get it.

        Asynchronous so that ingest overlaps the lookup with writing the payload.
        """
        future = self.session.execute_async(
            self._stmt("SELECT sha256, version FROM instance_locations WHERE sop_instance_uid = ?"),
            (sop_instance_uid,),
            timeout=2.0,
        )

        def result() -> StoredVersion | None:
            row = future.result().one()
            return StoredVersion(row.sha256, row.version) if row else None

        return result

    def max_version(self, sop_instance_uid: str) -> int:
        rows = self.execute("SELECT version FROM instance_versions WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return max((r.version for r in rows), default=0)

    # -- indexing --------------------------------------------------------------------------------

    def index_instances(self, events: Iterable[dict[str, Any]], concurrency: int = 64) -> None:
        """Upsert the rows of ``dicom.instance.stored`` events (aggregates: :meth:`refresh_study`).

        Writes travel in unlogged batches, which Cassandra applies as one request each: a study's
        ``instances`` rows (one partition) a few at a time, and each instance's rows keyed by UID or
        digest together. Each write stays an idempotent upsert with its own timestamp, so a batch that
        fails half-way is simply replayed.
        """
        events = list(events)
        writes: list[tuple[Any, Any]] = []
        by_study: dict[str, list[tuple[PreparedStatement, tuple[Any, ...]]]] = {}
        for event in events:
            instance_row, *keyed_rows = self._instance_writes(event)
            by_study.setdefault(event["study"]["uid"], []).append(instance_row)
            writes.append((_unlogged(keyed_rows), None))
        for rows in by_study.values():
            for start in range(0, len(rows), INSTANCE_ROWS_PER_BATCH):
                writes.append((_unlogged(rows[start:start + INSTANCE_ROWS_PER_BATCH]), None))
        writes += self._level_writes(events)
        execute_concurrent(self.session, writes, concurrency=concurrency, raise_on_first_error=True)

    def record_location(self, event: dict[str, Any], timeout: float = 2.0) -> Any:
        """Start writing the instance's location row, as the indexer will (same row, same timestamp).

        Ingest calls this once the event is in Kafka, so that a resend of the same SOP Instance UID is
        recognised (identical: no new event; different: the next version) instead of depending on how
        far the indexer has got. It does not wait: the row is a hint (the indexer writes it too), and the
        receiving process remembers its recent versions itself. Returns the driver's future.
        """
        stmt, params = self._location_write(event)
        future = self.session.execute_async(stmt, params, timeout=timeout)
        future.add_errback(
            lambda exc: log.warning("location not recorded at ingest; the indexer will write it", error=str(exc))
        )
        return future

    def _location_write(self, event: dict[str, Any]) -> tuple[PreparedStatement, tuple[Any, ...]]:
        study, series, payload = event["study"], event["series"], event["payload"]
        received = _ts(event["occurred_at"])
        return self._write(
            "INSERT INTO instance_locations (sop_instance_uid, study_uid, series_uid, sha256, version, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
            (event["instance"]["sop_instance_uid"], study["uid"], series["uid"], payload["sha256"], event["version"],
             received, _micros(received)),
        )

    def _instance_writes(self, event: dict[str, Any]) -> list[tuple[PreparedStatement, tuple[Any, ...]]]:
        """The instance-level upserts of one event, as (statement, parameters); ``instances`` first."""
        study, series, inst, payload = event["study"], event["series"], event["instance"], event["payload"]
        received = _ts(event["occurred_at"])
        at = _micros(received)
        event_id = uuid.UUID(event["event_id"])
        sop_uid = inst["sop_instance_uid"]
        w = self._write
        writes = [
            w(
                "INSERT INTO instances (study_uid, series_uid, sop_instance_uid, sop_class_uid, instance_number,"
                " transfer_syntax_uid, rows, columns, number_of_frames, size, sha256, payload_uri, version,"
                " received_site, received_at, event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " USING TIMESTAMP ?",
                (study["uid"], series["uid"], sop_uid, inst["sop_class_uid"], inst.get("number"),
                 inst["transfer_syntax_uid"], inst.get("rows"), inst.get("columns"), inst.get("number_of_frames"),
                 payload["size"], payload["sha256"], payload["uri"], event["version"], event["site"], received,
                 event_id, at),
            ),
            w(
                "INSERT INTO instance_versions (sop_instance_uid, sha256, version, study_uid, series_uid, size,"
                " received_site, received_at, event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sop_uid, payload["sha256"], event["version"], study["uid"], series["uid"], payload["size"],
                 event["site"], received, event_id),
            ),
            self._location_write(event),
            w(
                "INSERT INTO replicas (sha256, site, size, payload_uri, stored_at) VALUES (?, ?, ?, ?, ?)",
                (payload["sha256"], payload["site"], payload["size"], payload["uri"], received),
            ),
        ]
        return writes

    def _level_writes(self, events: list[dict[str, Any]]) -> list[tuple[PreparedStatement, tuple[Any, ...]]]:
        """The series, study and patient upserts of a batch.

        They are written ``USING TIMESTAMP`` of receive time, so of all the events of a batch that
        describe one series, study or patient only the newest can win (the oldest, for a study's
        first_received_at): only those are written, not one per instance.
        """
        # key -> (receive time, the events received at that time); study -> (earliest time, its event)
        newest: dict[tuple[str, str], tuple[dt.datetime, list[dict[str, Any]]]] = {}
        oldest: dict[str, tuple[dt.datetime, dict[str, Any]]] = {}
        for event in events:
            at = _ts(event["occurred_at"])
            study, series, patient = event["study"]["uid"], event["series"]["uid"], event["patient"].get("id")
            for key in (("series", series), ("study", study), *([("patient", patient)] if patient else [])):
                best = newest.get(key)
                if best is None or at > best[0]:
                    newest[key] = (at, [event])
                elif at == best[0]:
                    best[1].append(event)  # a tie is settled by Cassandra (by value), as before
            if study not in oldest or at < oldest[study][0]:
                oldest[study] = (at, event)
        writes = []
        for (level, _), (_, tied) in newest.items():
            for event in tied:
                writes.extend(self._level_write(level, event))
        for study_uid, (received, _) in oldest.items():
            # first_received_at keeps the earliest time: a lower write timestamp never overrides a
            # higher one, so it is written with an inverted timestamp.
            writes.append(self._write(
                "UPDATE studies USING TIMESTAMP ? SET first_received_at = ? WHERE study_uid = ?",
                (2**62 - _micros(received), received, study_uid),
            ))
        return writes

    def _level_write(self, level: str, event: dict[str, Any]) -> list[tuple[PreparedStatement, tuple[Any, ...]]]:
        study, series, patient = event["study"], event["series"], event["patient"]
        at = _micros(_ts(event["occurred_at"]))
        w = self._write
        if level == "series":
            return [w(
                "INSERT INTO series (study_uid, series_uid, modality, series_number, series_description,"
                " body_part_examined, series_date, series_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
                (study["uid"], series["uid"], series.get("modality"), series.get("number"), series.get("description"),
                 series.get("body_part_examined"), series.get("date"), series.get("time"), at),
            )]
        if level == "study":
            return [w(
                "UPDATE studies USING TIMESTAMP ? SET patient_id = ?, issuer_of_patient_id = ?, patient_name = ?,"
                " patient_birth_date = ?, patient_sex = ?, study_date = ?, study_day = ?, study_time = ?,"
                " accession_number = ?, study_id = ?, study_description = ?, referring_physician_name = ?,"
                " specific_character_set = ?, bucket = ? WHERE study_uid = ?",
                (at, patient.get("id"), patient.get("issuer"), patient.get("name"), patient.get("birth_date"),
                 patient.get("sex"), study.get("date"), parse_da(study.get("date")), study.get("time"),
                 study.get("accession_number"), study.get("id"), study.get("description"),
                 study.get("referring_physician_name"), study.get("specific_character_set"),
                 study_bucket(study["uid"]), study["uid"]),
            )]
        # The PATIENT level of C-FIND; the newest demographics win, as for studies. Patients are listed
        # through the same 32 stable buckets as studies.
        return [w(
            "UPDATE patients USING TIMESTAMP ? SET issuer_of_patient_id = ?, patient_name = ?,"
            " patient_birth_date = ?, patient_sex = ?, bucket = ? WHERE patient_id = ?",
            (at, patient.get("issuer"), patient.get("name"), patient.get("birth_date"), patient.get("sex"),
             study_bucket(patient["id"]), patient["id"]),
        )]

    def refresh_study(self, study_uid: str, new_sop_classes: Iterable[str] | None = None) -> None:
        """Recompute a study's and its series' aggregates from the instance rows.

        Instance counts are counted by Cassandra per series (``GROUP BY``), so a batch costs one small
        answer however large the study has grown. The study's SOP classes only grow while instances
        are added: with ``new_sop_classes`` (the classes of the batch) they are the stored set plus
        those; without it (a batch that replaced a version) they are read again from every row.
        """
        per_series = {
            row.series_uid: row.n
            for row in self.execute(
                "SELECT series_uid, count(*) AS n FROM instances WHERE study_uid = ? GROUP BY series_uid",
                (study_uid,),
                timeout=30.0,
            )
        }
        modalities = {
            r.modality
            for r in self.execute("SELECT modality FROM series WHERE study_uid = ?", (study_uid,))
            if r.modality
        }
        now = dt.datetime.now(dt.timezone.utc)
        for series_uid, count in per_series.items():
            self.execute(
                "UPDATE series SET number_of_instances = ?, updated_at = ? WHERE study_uid = ? AND series_uid = ?",
                (count, now, study_uid, series_uid),
            )
        # Overwriting a set column writes a tombstone, and every study listing of C-FIND/QIDO-RS reads
        # past them: rewrite the sets only when they changed (usually the first batch of a study). They
        # are written before the counts, so whoever sees the final counts sees the final sets.
        current = self.execute(
            "SELECT modalities_in_study, sop_classes_in_study FROM studies WHERE study_uid = ?", (study_uid,)
        ).one()
        known = (set(current.modalities_in_study or ()), set(current.sop_classes_in_study or ())) if current else None
        if new_sop_classes is not None and known is not None:
            sop_classes = known[1] | set(new_sop_classes)
        else:
            sop_classes = {
                row.sop_class_uid
                for row in self.execute(
                    "SELECT sop_class_uid FROM instances WHERE study_uid = ?", (study_uid,), timeout=30.0
                )
            }
        if known != (modalities, sop_classes):
            self.execute(
                "UPDATE studies SET modalities_in_study = ?, sop_classes_in_study = ? WHERE study_uid = ?",
                (modalities, sop_classes, study_uid),
            )
        self.execute(
            "UPDATE studies SET number_of_series = ?, number_of_instances = ?, updated_at = ? WHERE study_uid = ?",
            (len(per_series), sum(per_series.values()), now, study_uid),
        )

    # -- reads -----------------------------------------------------------------------------------

    def study(self, study_uid: str) -> Any:
        return self.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).one()

    def instances_of_study(self, study_uid: str) -> list[Any]:
        return list(self.execute("SELECT * FROM instances WHERE study_uid = ?", (study_uid,)))

    def instance_location(self, sop_instance_uid: str) -> Any:
        return self.execute(
            "SELECT * FROM instance_locations WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).one()

    # -- query reads (C-FIND, QIDO-RS) -----------------------------------------------------------
    # Every read names a partition key or a Storage-Attached Index: never ALLOW FILTERING. Results are
    # paged with ``fetch_size`` and consumed lazily, so a large answer is never held in memory at once;
    # what the indexes cannot express is matched in Python by dicomgrid.consumers.query.

    QUERY_PAGE_ROWS = 500
    SCAN_PAGE_ROWS = 200

    def _paged(self, cql: str, param_sets: Iterable[tuple[Any, ...]], fetch_size: int) -> Iterable[Any]:
        """Rows of one statement for each parameter set, in order.

        The first page of every parameter set is requested at once (the 32 buckets of a listing are
        read in parallel); later pages are fetched as the caller iterates.
        """
        stmt = self._stmt(cql)
        futures = []
        for params in param_sets:
            bound = stmt.bind(params)
            bound.fetch_size = fetch_size
            futures.append(self.session.execute_async(bound))
        for future in futures:
            yield from future.result()

    def _buckets(self, cql: str) -> Iterable[Any]:
        return self._paged(cql, [(b,) for b in range(STUDY_BUCKETS)], self.SCAN_PAGE_ROWS)

    def studies_by_uid(self, study_uids: Iterable[str]) -> Iterable[Any]:
        return self._paged(
            "SELECT * FROM studies WHERE study_uid = ?", [(u,) for u in study_uids], self.QUERY_PAGE_ROWS
        )

    def studies_by_patient_id(self, patient_id: str) -> Iterable[Any]:
        return self._paged("SELECT * FROM studies WHERE patient_id = ?", [(patient_id,)], self.QUERY_PAGE_ROWS)

    def studies_by_accession(self, accession_number: str) -> Iterable[Any]:
        return self._paged(
            "SELECT * FROM studies WHERE accession_number = ?", [(accession_number,)], self.QUERY_PAGE_ROWS
        )

    def studies_by_day(self, first: dt.date | None, last: dt.date | None) -> Iterable[Any]:
        """Studies whose StudyDate lies in [first, last]; either bound may be open."""
        if first is not None and last is not None:
            cql, params = "SELECT * FROM studies WHERE study_day >= ? AND study_day <= ?", (first, last)
        elif first is not None:
            cql, params = "SELECT * FROM studies WHERE study_day >= ?", (first,)
        elif last is not None:
            cql, params = "SELECT * FROM studies WHERE study_day <= ?", (last,)
        else:
            raise ValueError("a study day range needs at least one bound")
        return self._paged(cql, [params], self.QUERY_PAGE_ROWS)

    def studies_by_modality(self, modality: str) -> Iterable[Any]:
        return self._paged(
            "SELECT * FROM studies WHERE modalities_in_study CONTAINS ?", [(modality,)], self.QUERY_PAGE_ROWS
        )

    def all_studies(self) -> Iterable[Any]:
        """Every study, bucket by bucket (for queries no index can narrow)."""
        return self._buckets("SELECT * FROM studies WHERE bucket = ?")

    def series_of_study(self, study_uid: str) -> Iterable[Any]:
        return self._paged("SELECT * FROM series WHERE study_uid = ?", [(study_uid,)], self.QUERY_PAGE_ROWS)

    def series_by_uid(self, series_uids: Iterable[str]) -> Iterable[Any]:
        return self._paged(
            "SELECT * FROM series WHERE series_uid = ?", [(u,) for u in series_uids], self.QUERY_PAGE_ROWS
        )

    def series_by_modality(self, modality: str) -> Iterable[Any]:
        return self._paged("SELECT * FROM series WHERE modality = ?", [(modality,)], self.QUERY_PAGE_ROWS)

    def instances_of_series(self, study_uid: str, series_uid: str) -> Iterable[Any]:
        return self._paged(
            "SELECT * FROM instances WHERE study_uid = ? AND series_uid = ?",
            [(study_uid, series_uid)],
            self.QUERY_PAGE_ROWS,
        )

    def instance_locations_of(self, sop_instance_uids: Iterable[str]) -> Iterable[Any]:
        return self._paged(
            "SELECT * FROM instance_locations WHERE sop_instance_uid = ?",
            [(u,) for u in sop_instance_uids],
            self.QUERY_PAGE_ROWS,
        )

    def instance_row(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Any:
        return self.execute(
            "SELECT * FROM instances WHERE study_uid = ? AND series_uid = ? AND sop_instance_uid = ?",
            (study_uid, series_uid, sop_instance_uid),
        ).one()

    def patients_by_id(self, patient_ids: Iterable[str]) -> Iterable[Any]:
        return self._paged(
            "SELECT * FROM patients WHERE patient_id = ?", [(p,) for p in patient_ids], self.QUERY_PAGE_ROWS
        )

    def all_patients(self) -> Iterable[Any]:
        return self._buckets("SELECT * FROM patients WHERE bucket = ?")

    def study_counts_of_patient(self, patient_id: str) -> Iterable[Any]:
        """(number_of_series, number_of_instances) of each study of a patient."""
        return self._paged(
            "SELECT number_of_series, number_of_instances FROM studies WHERE patient_id = ?",
            [(patient_id,)],
            self.QUERY_PAGE_ROWS,
        )

"""The indexer's writes: ``dicom.instance.stored`` events as rows of the DICOM index in Cassandra.

Every write is an idempotent upsert. Instance-level rows are written ``USING TIMESTAMP`` of the time
the payload was received, so the newest version of an instance wins whatever order events are
replayed in. The indexer numbers versions (:meth:`IndexWriter.number_versions`): a payload's version is
its rank, by receive time, among the distinct payloads of its SOP Instance UID.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement

from dicomgrid.core.blobstore import BlobRef
from dicomgrid.core.cassandra import Cassandra, PartitionWrites, Write, unlogged
from dicomgrid.core.index_rows import parse_da, study_bucket
from dicomgrid.core.ledger import replica_write
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

# SOP Instance UIDs per look-up of their known versions (one request, partition-key IN).
VERSION_LOOKUP_SLICE = 100


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _ts(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _micros(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _millis(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000)


def _unlogged(writes: list[Write]) -> BatchStatement:
    return unlogged(writes)


@dataclass
class Numbered:
    """One event of a batch with what the indexer decided about it."""

    event: dict[str, Any]
    version: int
    # The payload's receive time: when it was first indexed (a resend or replay keeps it).
    received: dt.datetime
    # No payload of this SOP Instance UID was indexed before, nor earlier in the batch.
    new_instance: bool
    # Another payload of this SOP Instance UID was indexed before, or earlier in the batch.
    replaced: bool
    # An earlier payload of this SOP Instance UID was indexed under another study or series.
    moved: bool


@dataclass
class _Payload:
    sha256: str
    received: dt.datetime
    study_uid: str
    series_uid: str
    stored_version: int | None = None  # as instance_versions has it (None: not written yet)


@dataclass
class Numbering:
    numbered: list[Numbered] = field(default_factory=list)
    # Versions of already indexed payloads that a late, older payload moved up by one, with the
    # partition key each updates.
    fixes: list[tuple[str, Write]] = field(default_factory=list)


class IndexWriter:
    """Upserts the index rows of instance events (the indexer), and the location row (ingest)."""

    def __init__(self, db: Cassandra) -> None:
        self.db = db

    def index_instances(self, events: Iterable[dict[str, Any]], concurrency: int = 64) -> list[Numbered]:
        """Upsert the rows of ``dicom.instance.stored`` events, numbering their versions; returns the
        events as numbered (for callers that keep no study aggregates; the indexer adds those to the
        same requests, see :meth:`index_writes`)."""
        events = list(events)
        numbering = self.number_versions(events)
        self.execute(self.index_writes(events, numbering), concurrency=concurrency)
        return numbering.numbered

    def index_writes(self, events: Sequence[dict[str, Any]], numbering: "Numbering") -> PartitionWrites:
        """The upserts of a numbered batch, by partition: one request per partition of the batch.

        A study's ``instances`` rows travel with its ``series`` and ``studies`` upserts, a SOP Instance
        UID's ``instance_versions`` row with its ``instance_locations`` row (and with the payload's
        ``replicas`` row when the same replicas hold both). Each write stays an idempotent upsert with
        its own timestamp, so a batch that fails half-way is simply replayed.
        """
        writes = PartitionWrites()
        for item in numbering.numbered:
            event = item.event
            instance_row, version_row, location_row, replica_row = self._instance_writes(item)
            writes.add(event["study"]["uid"], instance_row)
            writes.add(event["instance"]["sop_instance_uid"], version_row, location_row, beside=event["payload"]["sha256"])
            writes.add(event["payload"]["sha256"], replica_row)
        for key, write in numbering.fixes:
            writes.add(key, write)
        for key, write in self._level_writes(list(events)):
            writes.add(key, write)
        return writes

    def _known_payloads(self, sop_instance_uids: Sequence[str]) -> dict[str, dict[str, _Payload]]:
        """The indexed payloads of these SOP Instance UIDs (``instance_versions``), by UID and digest."""
        known: dict[str, dict[str, _Payload]] = {}
        stmt = self.db.prepare(
            "SELECT sop_instance_uid, sha256, version, study_uid, series_uid, received_at FROM instance_versions"
            " WHERE sop_instance_uid IN ?"
        )
        futures = [
            self.db.session.execute_async(stmt, (list(sop_instance_uids[start:start + VERSION_LOOKUP_SLICE]),))
            for start in range(0, len(sop_instance_uids), VERSION_LOOKUP_SLICE)
        ]
        for future in futures:
            for row in future.result():
                received = row.received_at.replace(tzinfo=dt.timezone.utc) if row.received_at else _EPOCH
                known.setdefault(row.sop_instance_uid, {})[row.sha256] = _Payload(
                    row.sha256, received, row.study_uid, row.series_uid, row.version)
        return known

    def number_versions(self, events: Sequence[dict[str, Any]]) -> Numbering:
        """Number the payloads of the batch's SOP Instance UIDs.

        The rule (docs/events.md): the distinct payloads (digests) of a SOP Instance UID are numbered
        1, 2, ... in the order they were received (the ``occurred_at`` of the first event that named
        each; ties by digest). A payload already indexed keeps its receive time, so a resend or a replay
        changes nothing; a payload received earlier than one already indexed (a late event) moves the
        later ones up by one. One look-up per batch (``instance_versions``, partition-key IN).
        """
        uids = list(dict.fromkeys(e["instance"]["sop_instance_uid"] for e in events))
        known = self._known_payloads(uids) if uids else {}
        before = {uid: dict(payloads) for uid, payloads in known.items()}
        # Every payload of each UID: the indexed ones and the batch's.
        for event in events:
            uid, sha = event["instance"]["sop_instance_uid"], event["payload"]["sha256"]
            at = _ts(event["occurred_at"])
            payloads = known.setdefault(uid, {})
            held = payloads.get(sha)
            if held is None:
                payloads[sha] = _Payload(sha, at, event["study"]["uid"], event["series"]["uid"])
            elif held.stored_version is None and at < held.received:
                held.received = at
        ranks = {
            uid: {p.sha256: n for n, p in enumerate(sorted(payloads.values(), key=lambda p: (p.received, p.sha256)), 1)}
            for uid, payloads in known.items()
        }
        out = Numbering()
        in_batch: set[tuple[str, str]] = set()
        seen: dict[str, set[str]] = {}
        for event in events:
            uid, sha = event["instance"]["sop_instance_uid"], event["payload"]["sha256"]
            in_batch.add((uid, sha))
            earlier = before.get(uid, {})
            shas = seen.setdefault(uid, set())
            payload = known[uid][sha]
            at = _ts(event["occurred_at"])
            # Cassandra keeps milliseconds: the event that made an indexed payload's row keeps its own
            # microseconds (its rows' write timestamps), any later one the indexed receive time.
            received = at if payload.stored_version is None or _millis(at) == _millis(payload.received) else payload.received
            out.numbered.append(Numbered(
                event,
                ranks[uid][sha],
                received,
                new_instance=not earlier and not shas,
                replaced=bool(set(earlier) - {sha}) or bool(shas - {sha}),
                moved=any((p.study_uid, p.series_uid) != (event["study"]["uid"], event["series"]["uid"])
                          for p in earlier.values()),
            ))
            shas.add(sha)
        # Indexed payloads the batch does not rewrite, whose rank a late older payload changed.
        for uid, payloads in before.items():
            newest = max(payloads.values(), key=lambda p: (p.received, p.sha256))
            for payload in payloads.values():
                rank = ranks[uid][payload.sha256]
                if payload.stored_version == rank or (uid, payload.sha256) in in_batch:
                    continue
                out.fixes.append((uid, self.db.write(
                    "UPDATE instance_versions SET version = ? WHERE sop_instance_uid = ? AND sha256 = ?",
                    (rank, uid, payload.sha256),
                )))
                if payload is newest:
                    # Its rows are current: their version column follows, at their own write timestamp
                    # (a tie of timestamps is settled by value, and the higher number is the later one).
                    row = self.db.execute(
                        "SELECT WRITETIME(version) AS at FROM instance_locations WHERE sop_instance_uid = ?", (uid,)
                    ).one()
                    at = row.at if row is not None and row.at is not None else _micros(payload.received)
                    out.fixes.append((uid, self.db.write(
                        "UPDATE instance_locations USING TIMESTAMP ? SET version = ? WHERE sop_instance_uid = ?",
                        (at, rank, uid),
                    )))
                    out.fixes.append((payload.study_uid, self.db.write(
                        "UPDATE instances USING TIMESTAMP ? SET version = ? WHERE study_uid = ? AND series_uid = ?"
                        " AND sop_instance_uid = ?",
                        (at, rank, payload.study_uid, payload.series_uid, uid),
                    )))
        return out

    def _instance_writes(self, item: Numbered) -> list[Write]:
        """The instance-level upserts of one numbered event, as (statement, parameters); ``instances``
        first. ``instance_locations`` (by UID alone: retrieve by UID, storage commitment) is written
        here only: the receive path no longer touches Cassandra."""
        event, version, received = item.event, item.version, item.received
        study, series, inst, payload = event["study"], event["series"], event["instance"], event["payload"]
        at = _micros(received)
        event_id = uuid.UUID(event["event_id"])
        sop_uid = inst["sop_instance_uid"]
        w = self.db.write
        writes = [
            w(
                "INSERT INTO instances (study_uid, series_uid, sop_instance_uid, sop_class_uid, instance_number,"
                " transfer_syntax_uid, rows, columns, number_of_frames, size, sha256, payload_uri, version,"
                " received_site, received_at, event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " USING TIMESTAMP ?",
                (study["uid"], series["uid"], sop_uid, inst["sop_class_uid"], inst.get("number"),
                 inst["transfer_syntax_uid"], inst.get("rows"), inst.get("columns"), inst.get("number_of_frames"),
                 payload["size"], payload["sha256"], payload["uri"], version, event["site"], received,
                 event_id, at),
            ),
            w(
                "INSERT INTO instance_versions (sop_instance_uid, sha256, version, study_uid, series_uid, size,"
                " received_site, received_at, event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sop_uid, payload["sha256"], version, study["uid"], series["uid"], payload["size"],
                 event["site"], received, event_id),
            ),
            w(
                "INSERT INTO instance_locations (sop_instance_uid, study_uid, series_uid, sha256, version, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
                (sop_uid, study["uid"], series["uid"], payload["sha256"], version, received, at),
            ),
            # The receiving site hashed the bytes as it wrote them: its copy is verified on arrival.
            replica_write(self.db, BlobRef(payload["site"], payload["sha256"], payload["size"]), received, received),
        ]
        return writes

    def _level_writes(self, events: list[dict[str, Any]]) -> list[tuple[str, Write]]:
        """The series, study and patient upserts of a batch, with the partition key each updates.

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
                key = event["patient"]["id"] if level == "patient" else event["study"]["uid"]
                writes.extend((key, write) for write in self._level_write(level, event))
        for study_uid, (received, _) in oldest.items():
            # first_received_at keeps the earliest time: a lower write timestamp never overrides a
            # higher one, so it is written with an inverted timestamp.
            writes.append((study_uid, self.db.write(
                "UPDATE studies USING TIMESTAMP ? SET first_received_at = ? WHERE study_uid = ?",
                (2**62 - _micros(received), received, study_uid),
            )))
        return writes

    def _level_write(self, level: str, event: dict[str, Any]) -> list[Write]:
        study, series, patient = event["study"], event["series"], event["patient"]
        at = _micros(_ts(event["occurred_at"]))
        w = self.db.write
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

    def empty_studies(self, study_uids: Iterable[str]) -> set[str]:
        """Those of the studies that have no ``instances`` row (one single-row read each, in parallel)."""
        stmt = self.db.prepare("SELECT sop_instance_uid FROM instances WHERE study_uid = ? LIMIT 1")
        futures = {uid: self.db.session.execute_async(stmt, (uid,)) for uid in study_uids}
        return {uid for uid, future in futures.items() if future.result().one() is None}

    def read_study(self, study_uid: str, new_sop_classes: Iterable[str] | None = None) -> "StudyAggregates":
        """A study's aggregates recounted from its rows (a full read of its ``instances`` partition).

        Instance counts are counted by Cassandra per series (``GROUP BY``). The study's SOP classes only
        grow while instances are added: with ``new_sop_classes`` (the classes of the batch) they are the
        stored set plus those; without it (a batch that replaced a version) they are read again from
        every row.
        """
        per_series = {
            row.series_uid: row.n
            for row in self.db.execute(
                "SELECT series_uid, count(*) AS n FROM instances WHERE study_uid = ? GROUP BY series_uid",
                (study_uid,),
                timeout=30.0,
            )
        }
        modality = {
            r.series_uid: (_EPOCH, r.modality)
            for r in self.db.execute("SELECT series_uid, modality FROM series WHERE study_uid = ?", (study_uid,))
        }
        current = self.db.execute(
            "SELECT modalities_in_study, sop_classes_in_study FROM studies WHERE study_uid = ?", (study_uid,)
        ).one()
        known = (frozenset(current.modalities_in_study or ()), frozenset(current.sop_classes_in_study or ())) if current else None
        if new_sop_classes is not None and known is not None:
            sop_classes = set(known[1]) | set(new_sop_classes)
        else:
            sop_classes = {
                row.sop_class_uid
                for row in self.db.execute(
                    "SELECT sop_class_uid FROM instances WHERE study_uid = ?", (study_uid,), timeout=30.0
                )
            }
        return StudyAggregates(per_series, modality, sop_classes, stored_sets=known)

    def aggregate_writes(self, study_uid: str, state: "StudyAggregates", all_series: bool = False) -> list[Write]:
        """The writes that store a study's aggregates, all in the study's partition (``series`` and
        ``studies`` are keyed by its UID): the caller sends them with the batch's other writes there.

        Only the series counts that changed are written (every one with ``all_series``); the study's
        counts always, and its sets only when they changed. Overwriting a set column writes a
        tombstone, and every study listing of C-FIND/QIDO-RS reads past them: the sets are rewritten
        only when they changed (usually the first batch of a study).
        """
        now = dt.datetime.now(dt.timezone.utc)
        writes = [
            self.db.write(
                "UPDATE series SET number_of_instances = ?, updated_at = ? WHERE study_uid = ? AND series_uid = ?",
                (count, now, study_uid, series_uid),
            )
            for series_uid, count in state.series.items()
            if all_series or state.stored_series.get(series_uid) != count
        ]
        modalities, sop_classes = state.sets()
        counts = (len([n for n in state.series.values() if n]), sum(state.series.values()), now, study_uid)
        if (modalities, sop_classes) != state.stored_sets:
            writes.append(self.db.write(
                "UPDATE studies SET modalities_in_study = ?, sop_classes_in_study = ?, number_of_series = ?,"
                " number_of_instances = ?, updated_at = ? WHERE study_uid = ?",
                (set(modalities), set(sop_classes), *counts),
            ))
        else:
            writes.append(self.db.write(
                "UPDATE studies SET number_of_series = ?, number_of_instances = ?, updated_at = ? WHERE study_uid = ?",
                counts,
            ))
        return writes

    def execute(self, writes: "PartitionWrites | list[tuple[Any, Any]]", concurrency: int = 64) -> None:
        if isinstance(writes, PartitionWrites):
            writes = writes.statements(getattr(self.db, "replicas", None), _unlogged)
        if writes:
            execute_concurrent(self.db.session, writes, concurrency=concurrency, raise_on_first_error=True)


@dataclass
class StudyAggregates:
    """A study's aggregates as the indexer keeps them between batches."""

    series: dict[str, int] = field(default_factory=dict)  # series UID -> instances
    modality: dict[str, tuple[dt.datetime, str | None]] = field(default_factory=dict)  # newest per series
    sop_classes: set[str] = field(default_factory=set)
    # What Cassandra holds since the last write: the studies row's sets, the series rows' counts.
    stored_sets: tuple[frozenset[str], frozenset[str]] | None = None
    stored_series: dict[str, int] = field(default_factory=dict)

    def copy(self) -> "StudyAggregates":
        return StudyAggregates(dict(self.series), dict(self.modality), set(self.sop_classes), self.stored_sets,
                               dict(self.stored_series))

    def sets(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset(m for _, m in self.modality.values() if m), frozenset(self.sop_classes)

    def covers(self, items: Iterable[Numbered]) -> bool:
        """Whether the batch's events can move these aggregates on: every instance either new or one
        already counted in its series (anything else: recount from the rows)."""
        return all(
            not (i.replaced or i.moved) and (i.new_instance or self.series.get(i.event["series"]["uid"], 0) > 0)
            for i in items
        )

    def add(self, items: Iterable[Numbered]) -> bool:
        """Count the batch's new instances in; whether anything Cassandra holds changed."""
        for item in items:
            event = item.event
            series = event["series"]["uid"]
            if item.new_instance:
                self.series[series] = self.series.get(series, 0) + 1
            self.sop_classes.add(event["instance"]["sop_class_uid"])
            at = _ts(event["occurred_at"])
            held = self.modality.get(series)
            if held is None or at >= held[0]:
                self.modality[series] = (at, event["series"].get("modality"))
        return self.series != self.stored_series or self.sets() != self.stored_sets

    def written(self) -> None:
        self.stored_sets = self.sets()
        self.stored_series = dict(self.series)
